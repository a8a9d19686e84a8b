"""A tiny search setting (4 steps, 4 samples, 2 generations) shared by the search tests."""

from __future__ import annotations

from tmpq.models.denoiser import UNetDenoiser
from tmpq.models.loading import LoadedModel
from tmpq.quant import CalibConfig, QuantSpec
from tmpq.sampling.schedules import NoiseSchedule
from tmpq.search import Budget, EvolutionConfig, FitnessConfig, SearchConfig


def tiny_loaded(make_tiny_unet) -> LoadedModel:
    return LoadedModel(UNetDenoiser(make_tiny_unet()), NoiseSchedule(), (1, 32, 32), "tiny", None)


def tiny_search_config(**kw) -> SearchConfig:
    base = dict(
        budget=Budget.like("W6A6", 4),
        steps=(4,),
        grouping="quad",  # the search machinery on one fixed grouping; `auto` has tests of its own
        lever="joint",  # the same for the lever
        evolution=EvolutionConfig(
            population=4, parents=2, mutations=2, crossovers=1, randoms=1, generations=2, repair=True
        ),
        fitness=FitnessConfig(kind="proxy", proxy_space="pixels", num_samples=4, reference_steps=8),
        calib=CalibConfig(num_samples=4, num_steps=4),
        quant=QuantSpec(w_bits=(4, 6, 8), a_bits=(6, 8), reconstruction=None),  # reconstruction: tests of its own
        sensitivity_inputs=4,
        final_samples=0,
    )
    return SearchConfig(**{**base, **kw})
