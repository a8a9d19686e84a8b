"""The joint search: timestep groups × per-layer bits, evolutionary search under a BitOPs budget."""

from tmpq.search.budget import Budget, CandidateCost, Repairer
from tmpq.search.config import SearchConfig
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
from tmpq.search.run import run_search
from tmpq.search.space import Candidate, SearchSpace, group_starts
from tmpq.search.summary import FinalRow, FinalScores, RunSummary, SearchCost

__all__ = [
    "Budget",
    "Candidate",
    "CandidateCost",
    "EvolutionConfig",
    "EvolutionarySearch",
    "Execution",
    "FitnessConfig",
    "FinalRow",
    "FinalScores",
    "FitnessValue",
    "PhasedDenoiser",
    "Record",
    "Repairer",
    "RunSummary",
    "SampleFitness",
    "SearchConfig",
    "SearchCost",
    "SearchCallback",
    "SearchResult",
    "SearchState",
    "SearchSpace",
    "group_starts",
    "pareto_front",
    "run_search",
]
