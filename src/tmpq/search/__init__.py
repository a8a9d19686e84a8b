"""The joint search: timestep groups × per-layer bits, evolutionary search under a BitOPs budget."""

from tmpq.search.budget import CandidateCost, Repairer
from tmpq.search.evolution import (
    EvolutionarySearch,
    EvolutionConfig,
    FitnessValue,
    Record,
    SearchCallback,
    SearchResult,
    SearchState,
    pareto_front,
)
from tmpq.search.fitness import FitnessConfig, PhasedDenoiser, SampleFitness
from tmpq.search.parallel import Execution
from tmpq.search.run import Budget, SearchConfig, run_search
from tmpq.search.space import Candidate, SearchSpace, group_starts

__all__ = [
    "Budget",
    "Candidate",
    "CandidateCost",
    "EvolutionConfig",
    "EvolutionarySearch",
    "Execution",
    "FitnessConfig",
    "FitnessValue",
    "PhasedDenoiser",
    "Record",
    "Repairer",
    "SampleFitness",
    "SearchConfig",
    "SearchCallback",
    "SearchResult",
    "SearchState",
    "SearchSpace",
    "group_starts",
    "pareto_front",
    "run_search",
]
