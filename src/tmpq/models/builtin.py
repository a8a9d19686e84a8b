"""The built-in model: a small DDPM UNet for 32x32 Fashion-MNIST, weights shipped in the package.

`builtin_unet_config` is the single source of the architecture; training (`tmpq train`) and
loading both use it, so a shipped checkpoint always matches the code that loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import UNet2DModel
from safetensors.torch import load_file

from tmpq.errors import TmpqError
from tmpq.sampling.schedules import NoiseSchedule

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_UNET = ASSETS / "fashion_unet.safetensors"
BUILTIN_SCHEDULE = NoiseSchedule(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


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


def build_unet(config: dict) -> UNet2DModel:
    try:
        return UNet2DModel(**config)
    except (TypeError, ValueError) as exc:
        raise TmpqError(f"invalid UNet2DModel config: {exc}") from exc


def load_unet_safetensors(path: Path | str) -> UNet2DModel:
    """Load a UNet saved by `tmpq train` (safetensors; the config lives in its metadata)."""
    path = Path(path)
    if not path.is_file():
        raise TmpqError(f"model file {path} not found; train one with `tmpq train` or pass an existing path")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise TmpqError(f"{path} is not a readable safetensors file ({exc}); re-export or re-train it") from exc
    if "unet_config" not in meta:
        raise TmpqError(f"{path} has no 'unet_config' metadata; it was not written by `tmpq train`")
    try:
        config = json.loads(meta["unet_config"])
    except ValueError as exc:
        raise TmpqError(
            f"{path} has 'unet_config' metadata that is not valid JSON ({exc}); the file is damaged: re-train it "
            "with `tmpq train`"
        ) from None
    if not isinstance(config, dict):
        raise TmpqError(f"{path}: its 'unet_config' metadata is not a JSON object; re-train it with `tmpq train`")
    unet = build_unet(config)
    try:
        missing, unexpected = unet.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of the wrong shape for the config (strict=False only forgives names)
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else type(exc).__name__
        raise TmpqError(
            f"{path}: its weights do not fit its UNet config ({detail}); the file is damaged or from another "
            "model: re-train it with `tmpq train`"
        ) from None
    if missing or unexpected:
        raise TmpqError(
            f"{path} does not match its UNet config (missing {len(missing)}, unexpected {len(unexpected)} tensors); "
            "the file is damaged or from another model"
        )
    return unet.eval()


def load_builtin_unet() -> UNet2DModel:
    """The shipped Fashion-MNIST UNet (EMA weights), in eval mode."""
    if not BUILTIN_UNET.is_file():
        raise TmpqError(
            f"the built-in weights {BUILTIN_UNET} are missing from this install; reinstall tmpq "
            "or train them with `tmpq train --out src/tmpq/assets/fashion_unet.safetensors`"
        )
    return load_unet_safetensors(BUILTIN_UNET)
