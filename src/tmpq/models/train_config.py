"""The training recipe of `tmpq train`, apart from the trainer so the command line can show its defaults without
importing torch and diffusers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tmpq.errors import TmpqError
from tmpq.serialization import DictConfig

ARCHITECTURES = ("unet", "dit")


@dataclass(frozen=True)
class TrainConfig(DictConfig):
    """Everything that determines a training run's weights; stored beside its checkpoints.

    How the run executes (device, `torch.compile`) is not part of it: those change speed, not the recipe.
    """

    # The defaults are the shipped built-in UNet's recipe: `tmpq train` with no options retrains it; the built-in DiT's
    # command is in its model card (src/tmpq/assets/fashion_dit.md).
    architecture: str = "unet"  # "unet": a UNet2DModel | "dit": a class-conditional DiTTransformer2DModel
    steps: int = 30000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 500
    ema_decay: float = 0.9995
    block_out_channels: tuple[int, ...] = (32, 32, 64)
    layers_per_block: int = 1
    # DiT only: patch side, transformer blocks, heads × head width, and the share of labels the trainer replaces with
    # the null class (the unconditional half that classifier-free guidance needs)
    patch_size: int = 4
    transformer_layers: int = 6
    attention_heads: int = 4
    head_dim: int = 32
    class_dropout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50  # the loss is read back to the host (a device sync) only this often
    autocast: str = "auto"  # "auto" | "bf16" | "off"
    # Start from these weights (a .safetensors `tmpq train` wrote, same architecture) instead of the seeded
    # initialization: a further cosine cycle over a finished run, so a longer training reuses the hours already spent.
    # "" trains from scratch.
    init_from: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise TmpqError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        for name in (
            "steps",
            "batch_size",
            "checkpoint_every",
            "log_every",
            "layers_per_block",
            "patch_size",
            "transformer_layers",
            "attention_heads",
            "head_dim",
        ):
            if getattr(self, name) < 1:
                raise TmpqError(f"{name} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TmpqError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise TmpqError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.class_dropout < 1:
            raise TmpqError(f"class_dropout must be in [0, 1), got {self.class_dropout}")
        if 32 % self.patch_size:
            raise TmpqError(f"patch_size must divide the 32-pixel image side, got {self.patch_size}")
        if self.warmup_steps < 0:
            raise TmpqError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise TmpqError(f"autocast must be auto, bf16 or off, got {self.autocast!r}")
