"""Turn a model spec string into (denoiser, noise schedule, sample shape)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from torch import nn

from tmpq.errors import TmpqError
from tmpq.models.builtin import BUILTIN_SCHEDULE, BUILTIN_UNET, load_builtin_unet, load_unet_safetensors
from tmpq.models.denoiser import UNetDenoiser
from tmpq.sampling.schedules import NoiseSchedule

BUILTIN_SPEC = "builtin:fashion"


@dataclass
class LoadedModel:
    denoiser: nn.Module
    schedule: NoiseSchedule
    sample_shape: tuple[int, ...]
    spec: str
    weights_path: Path | None


def load_model(spec: str = BUILTIN_SPEC) -> LoadedModel:
    """`builtin:fashion`, or a `.safetensors` UNet written by `tmpq train`."""
    if spec == BUILTIN_SPEC:
        unet, path, schedule = load_builtin_unet(), BUILTIN_UNET, BUILTIN_SCHEDULE
    elif spec.startswith("builtin:"):
        raise TmpqError(f"unknown built-in model {spec!r}; the built-in model is {BUILTIN_SPEC!r}")
    else:
        path = Path(spec)
        if not path.exists():
            raise TmpqError(f"model {spec!r} not found; pass {BUILTIN_SPEC!r} or a .safetensors file from `tmpq train`")
        if path.suffix != ".safetensors":
            raise TmpqError(
                f"{spec!r} is not a supported model; pass {BUILTIN_SPEC!r} or a .safetensors from `tmpq train`"
            )
        unet = load_unet_safetensors(path)
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        schedule = NoiseSchedule(**json.loads(meta["noise_schedule"])) if "noise_schedule" in meta else BUILTIN_SCHEDULE
    den = UNetDenoiser(unet).eval()
    return LoadedModel(den, schedule, den.sample_shape, spec, path)
