"""tmpq: make pretrained diffusion models cheap to run by searching, jointly, which timesteps to keep
and how many bits each layer gets (TMPQ-DM and beyond).

This release holds the foundation (the built-in Fashion-MNIST DDPM, DDIM over any timestep list,
FID/IS evaluation) and the quantization super-network (every layer calibrated once for every candidate
bit-width, switched per configuration, costed in BitOPs), and the joint evolutionary search over
timesteps and per-layer bits under a BitOPs budget (`run_search`, `tmpq search`), the one-call API
`tmpq.compress(model, budget=...)`, export of the compressed sampler and `tmpq.load`, and the report.
"""

from tmpq.allocator import keep_freed_memory
from tmpq.api import CompressionResult, compress
from tmpq.api import parse_budget as parse_budget  # deprecated: warns when called
from tmpq.api import sampler_from_run as sampler_from_run  # deprecated: warns when called
from tmpq.compressed import CompressedSampler
from tmpq.errors import TmpqError
from tmpq.evaluate import EvalConfig, EvalResult, evaluate
from tmpq.export import load
from tmpq.models.loading import load_model
from tmpq.quant import (
    CalibConfig,
    CalibrationSet,
    QuantConfig,
    QuantSpec,
    SuperNet,
    build_supernet,
    collect_calibration,
    quantize_,
)
from tmpq.runtime import Backend, RuntimeSampler
from tmpq.sampling.ddim import DDIMSampler, generate
from tmpq.sampling.schedules import NoiseSchedule, make_timesteps, quad_timesteps, uniform_timesteps
from tmpq.search import Budget, EvolutionConfig, FitnessConfig, SearchConfig, SearchSpace, run_search

__version__ = "0.1.0"
__all__ = [
    "CompressionResult",
    "compress",
    "CompressedSampler",
    "load",
    "Backend",
    "RuntimeSampler",
    "Budget",
    "EvolutionConfig",
    "FitnessConfig",
    "SearchConfig",
    "SearchSpace",
    "run_search",
    "CalibConfig",
    "CalibrationSet",
    "QuantConfig",
    "QuantSpec",
    "SuperNet",
    "build_supernet",
    "collect_calibration",
    "quantize_",
    "DDIMSampler",
    "EvalConfig",
    "EvalResult",
    "NoiseSchedule",
    "TmpqError",
    "keep_freed_memory",
    "evaluate",
    "generate",
    "load_model",
    "make_timesteps",
    "quad_timesteps",
    "uniform_timesteps",
]

# Old spellings, each with its one replacement; they warn for one release, then go. (parse_budget and
# sampler_from_run, imported above, warn when called.)
_DEPRECATED = {
    "lower": ("tmpq.runtime.lowering", "lower", "sampler.lower(backend)"),
    "to_diffusers": ("tmpq.pipeline", "to_diffusers", "sampler.to_diffusers()"),
}


def __getattr__(name: str):
    if name not in _DEPRECATED:
        raise AttributeError(f"module 'tmpq' has no attribute {name!r}")
    import importlib
    import warnings

    module, attr, instead = _DEPRECATED[name]
    warnings.warn(f"tmpq.{name} is deprecated; use {instead}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), attr)
