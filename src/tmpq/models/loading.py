"""Turn a model spec string into (denoiser, noise schedule, sample shape).

Specs: `builtin:fashion`; a `.safetensors` UNet from `tmpq train`; a diffusers pipeline or model, as a local
directory or a hub id (both through diffusers' own `load_config` / `from_pretrained`); or
`package.module:factory`, a function returning a `LoadedModel` or `(denoiser, NoiseSchedule, sample_shape)`.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from torch import nn

from tmpq.errors import TmpqError
from tmpq.models.builtin import BUILTIN_SCHEDULE, BUILTIN_UNET, load_builtin_unet, load_unet_safetensors
from tmpq.models.denoiser import UNetDenoiser
from tmpq.sampling.schedules import NoiseSchedule

BUILTIN_SPEC = "builtin:fashion"
SUPPORTED = (
    f"{BUILTIN_SPEC!r}, a .safetensors UNet from `tmpq train`, a diffusers pixel-space UNet2DModel pipeline or "
    "model (directory or hub id), or 'package.module:factory'"
)
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass
class LoadedModel:
    denoiser: nn.Module
    schedule: NoiseSchedule
    sample_shape: tuple[int, ...]
    spec: str
    weights_path: Path | None
    notes: tuple[str, ...] = ()  # what the loader had to assume (e.g. a default noise schedule)


def load_model(spec: str = BUILTIN_SPEC) -> LoadedModel:
    """Load any supported model spec (see the module doc); a clear error names what is supported."""
    if spec == BUILTIN_SPEC:
        unet, path, schedule = load_builtin_unet(), BUILTIN_UNET, BUILTIN_SCHEDULE
    elif spec.startswith("builtin:"):
        raise TmpqError(f"unknown built-in model {spec!r}; the built-in model is {BUILTIN_SPEC!r}")
    elif _FACTORY.fullmatch(spec) and not Path(spec).exists():
        return _from_factory(spec)
    elif spec.endswith(".safetensors"):
        path = Path(spec)
        if not path.is_file():
            raise TmpqError(f"model {spec!r} not found; pass {SUPPORTED}")
        unet = load_unet_safetensors(path)
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        schedule = NoiseSchedule(**json.loads(meta["noise_schedule"])) if "noise_schedule" in meta else BUILTIN_SCHEDULE
    elif Path(spec).is_file():
        raise TmpqError(f"{spec!r} is not a supported model file; pass {SUPPORTED}")
    else:
        return _from_diffusers(spec)
    den = UNetDenoiser(unet, schedule).eval()
    return LoadedModel(den, schedule, den.sample_shape, spec, path)


def _from_factory(spec: str) -> LoadedModel:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise TmpqError(f"model factory {spec!r} cannot be imported ({e}); pass {SUPPORTED}") from None
    out = fn()
    if isinstance(out, LoadedModel):
        return out
    try:
        denoiser, schedule, shape = out
    except (TypeError, ValueError):
        raise TmpqError(
            f"model factory {spec!r} returned {type(out).__name__}; it must return a tmpq LoadedModel or "
            "(denoiser, NoiseSchedule, sample_shape)"
        ) from None
    if not isinstance(denoiser, nn.Module) or not isinstance(schedule, NoiseSchedule):
        raise TmpqError(f"model factory {spec!r} must return (nn.Module denoiser, NoiseSchedule, sample_shape)")
    return LoadedModel(denoiser.eval(), schedule, tuple(int(s) for s in shape), spec, None)


def _from_diffusers(spec: str) -> LoadedModel:
    """A diffusers pipeline (model_index.json) or a bare UNet2DModel, local or from the hub."""
    from diffusers import DiffusionPipeline, UNet2DModel

    local = Path(spec)
    if not local.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") != 1):
        raise TmpqError(f"model {spec!r} not found; pass {SUPPORTED}")
    notes: list[str] = []
    try:
        index = DiffusionPipeline.load_config(spec)
        subfolder = "unet"
    except (OSError, ValueError):
        index, subfolder = None, None
    if index is not None:
        parts = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}
        if parts & {"vae", "vqvae"}:
            raise TmpqError(
                f"{spec!r} is a latent-diffusion pipeline ({index.get('_class_name')}); latent pipelines are not "
                f"supported yet. Supported: {SUPPORTED}"
            )
        if "text_encoder" in parts or index.get("unet", [None, None])[1] != "UNet2DModel":
            raise TmpqError(
                f"{spec!r} is a {index.get('_class_name')} with a {index.get('unet', [None, '?'])[1]} denoiser; "
                f"text-to-image and conditional pipelines are not supported yet. Supported: {SUPPORTED}"
            )
        sched = _scheduler_config(spec, "scheduler")
    else:
        try:
            cfg = UNet2DModel.load_config(spec)
        except (OSError, ValueError) as e:
            raise TmpqError(f"could not load {spec!r} as a diffusers pipeline or model ({e}); pass {SUPPORTED}") from (
                None
            )
        if cfg.get("_class_name") != "UNet2DModel":
            raise TmpqError(f"{spec!r} holds a {cfg.get('_class_name')}, not a UNet2DModel; pass {SUPPORTED}")
        sched = _scheduler_config(spec, None)
    if sched is None:
        sched = {}
        notes.append("no scheduler config found: assumed DDPM with T = 1000, linear betas 1e-4..0.02, epsilon")
    schedule = NoiseSchedule.from_scheduler_config(sched)
    try:
        unet = UNet2DModel.from_pretrained(spec, subfolder=subfolder)
    except (OSError, ValueError) as e:
        raise TmpqError(f"could not load the UNet of {spec!r} ({e})") from None
    den = UNetDenoiser(unet.eval(), schedule).eval()
    weights = None
    if local.is_dir():
        found = sorted((local / (subfolder or "")).glob("diffusion_pytorch_model*.safetensors"))
        weights = found[0] if found else None
    return LoadedModel(den, schedule, den.sample_shape, spec, weights, tuple(notes))


def _scheduler_config(spec: str, subfolder: str | None) -> dict | None:
    """The scheduler config of a pipeline (its `scheduler/`) or beside a bare model; None when there is none.
    Any scheduler class reads it: `load_config` is diffusers' ConfigMixin, the same for local dirs and hub ids."""
    from diffusers import DDPMScheduler

    for sub in [subfolder] if subfolder else [None, "scheduler"]:
        try:
            return dict(DDPMScheduler.load_config(spec, subfolder=sub))
        except (OSError, ValueError):
            continue
    return None
