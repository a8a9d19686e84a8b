"""The built-in models: a small DDPM UNet and a small class-conditional DiT for 32x32 Fashion-MNIST, weights shipped
in the package.

`builtin_unet_config` and `builtin_dit_config` are the single source of each architecture; training (`tmpq train`)
and loading both use them, so a shipped checkpoint always matches the code that loads it. A trained file names its
network by its metadata key (`unet_config` or `dit_config`), which holds the diffusers config.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from diffusers import DiTTransformer2DModel, UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from tmpq.errors import TmpqError
from tmpq.sampling.schedules import NoiseSchedule

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_UNET = ASSETS / "fashion_unet.safetensors"
BUILTIN_DIT = ASSETS / "fashion_dit.safetensors"
FASHION_NUM_CLASSES = 10
BUILTIN_DIT_GUIDANCE = 1.5
"""The classifier-free guidance scale `builtin:fashion-dit` samples with by default: the best FP FID of 1, 1.25, 1.5,
1.75 and 2 at 20 uniform steps, DDIM without x̂0 clipping (28.5 against 53.0 unguided, 33.6 at 1.25, 31.3 at 1.75 and
38.0 at 2; 1,000 samples; `bench/guidance.py`, docs/results.md)."""
BUILTIN_SCHEDULE = NoiseSchedule(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
BUILTIN_DIT_SCHEDULE = dataclasses.replace(BUILTIN_SCHEDULE, clip_sample=False)
"""The same training process, sampled without DDIM's clipping of x̂0 to [-1, 1]. At high t the DiT's x̂0 often
overshoots the pixel range; clipping it while keeping ε̂ makes each step inconsistent, and 100 guided steps compound
that into FID 347.8 (500 samples, guidance 1.25) where unclipped DDIM scores 32.6, better than 20 steps: 38.9; with
clipping the model looked unsound, without it FID falls with steps (bench/step_regions.py, docs/results.md). The UNet
keeps diffusers' default: its FID falls with steps with clipping, and all its tables were measured with it."""
SCHEDULES = {"unet_config": BUILTIN_SCHEDULE, "dit_config": BUILTIN_DIT_SCHEDULE}
"""The sampling schedule `tmpq train` declares in a file's `noise_schedule` metadata, by its network key."""


def builtin_unet_config(block_out_channels: tuple[int, ...] = (32, 32, 64), layers_per_block: int = 1) -> dict:
    """UNet2DModel kwargs of the built-in model (attention only at the 8x8 level, where it is cheap)."""
    n = len(block_out_channels)
    return {
        "sample_size": 32,
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": layers_per_block,
        "block_out_channels": list(block_out_channels),
        "down_block_types": ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D"] + ["UpBlock2D"] * (n - 1),
        "norm_num_groups": 8,
        "attention_head_dim": min(32, block_out_channels[-1]),
    }


def builtin_dit_config(patch_size: int = 4, layers: int = 6, heads: int = 4, head_dim: int = 32) -> dict:
    """DiTTransformer2DModel kwargs of the built-in DiT: pixels in, ε out (no learned variance: DDIM does not use
    it), adaLN-Zero conditioned on the timestep and the 10 Fashion-MNIST classes (+ DiT's null class for guidance)."""
    return {
        "sample_size": 32,
        "in_channels": 1,
        "out_channels": 1,
        "patch_size": patch_size,
        "num_layers": layers,
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "num_embeds_ada_norm": FASHION_NUM_CLASSES,
    }


NETWORKS: dict[str, type[nn.Module]] = {"unet_config": UNet2DModel, "dit_config": DiTTransformer2DModel}
"""The metadata key a `tmpq train` file stores its config under, and the diffusers class that config builds."""


def build_network(key: str, config: dict) -> nn.Module:
    cls = NETWORKS[key]
    try:
        return cls(**config)
    except (TypeError, ValueError) as exc:
        raise TmpqError(f"invalid {cls.__name__} config: {exc}") from exc


def build_unet(config: dict) -> UNet2DModel:
    return build_network("unet_config", config)


def trained_metadata(path: Path | str) -> dict[str, str]:
    """A safetensors file's metadata (its header only): where `tmpq train` keeps a file's network config, schedule and
    training facts. Raises what safetensors raises for a damaged file."""
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata() or {}


def load_trained(path: Path | str) -> nn.Module:
    """Load a network saved by `tmpq train` (safetensors; the config lives in its metadata): a UNet2DModel or a
    DiTTransformer2DModel, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise TmpqError(f"model file {path} not found; train one with `tmpq train` or pass an existing path")
    try:
        meta = trained_metadata(path)
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise TmpqError(f"{path} is not a readable safetensors file ({exc}); re-export or re-train it") from exc
    key = next((k for k in NETWORKS if k in meta), None)
    if key is None:
        raise TmpqError(f"{path} has no 'unet_config' or 'dit_config' metadata; it was not written by `tmpq train`")
    try:
        config = json.loads(meta[key])
    except ValueError as exc:
        raise TmpqError(
            f"{path} has '{key}' metadata that is not valid JSON ({exc}); the file is damaged: re-train it "
            "with `tmpq train`"
        ) from None
    if not isinstance(config, dict):
        raise TmpqError(f"{path}: its '{key}' metadata is not a JSON object; re-train it with `tmpq train`")
    unet = build_network(key, config)
    try:
        missing, unexpected = unet.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of the wrong shape for the config (strict=False only forgives names)
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else type(exc).__name__
        raise TmpqError(
            f"{path}: its weights do not fit its {key} ({detail}); the file is damaged or from another "
            "model: re-train it with `tmpq train`"
        ) from None
    if missing or unexpected:
        raise TmpqError(
            f"{path} does not match its {key} (missing {len(missing)}, unexpected {len(unexpected)} tensors); "
            "the file is damaged or from another model"
        )
    return unet.eval()


def load_builtin(path: Path) -> nn.Module:
    """A shipped Fashion-MNIST network (EMA weights), in eval mode; its card (the same name, .md) says how it was
    trained."""
    if not path.is_file():
        raise TmpqError(
            f"the built-in weights {path} are missing from this install; reinstall tmpq or retrain them with the "
            f"command in their model card ({path.with_suffix('.md').name})"
        )
    return load_trained(path)
