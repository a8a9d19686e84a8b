"""tmpq: make pretrained diffusion models cheap to run by searching, jointly, which timesteps to keep
and how many bits each layer gets (TMPQ-DM and beyond).

This release holds the foundation: the built-in Fashion-MNIST DDPM, DDIM over any timestep list,
and FID/IS evaluation. Quantization and the joint search build on these.
"""

from tmpq.errors import TmpqError
from tmpq.evaluate import EvalConfig, EvalResult, evaluate
from tmpq.models.loading import load_model
from tmpq.sampling.ddim import DDIMSampler, generate
from tmpq.sampling.schedules import NoiseSchedule, make_timesteps, quad_timesteps, uniform_timesteps

__version__ = "0.1.0"
__all__ = [
    "DDIMSampler",
    "EvalConfig",
    "EvalResult",
    "NoiseSchedule",
    "TmpqError",
    "evaluate",
    "generate",
    "load_model",
    "make_timesteps",
    "quad_timesteps",
    "uniform_timesteps",
]
