"""Timestep-aware calibration data (as Q-Diffusion): denoiser inputs gathered along FP sampling runs.

Quantization ranges must fit the activations of every timestep, and those drift a lot from t = T to
t = 0, so the inputs x_t are recorded at every step of full-precision DDIM trajectories spread over the
whole schedule. The calibration noise uses its own seed range, disjoint from evaluation seeds.

A text-to-image model is calibrated on its prompts: every row also records the id of its prompt, and the
prompt embeddings are stored once (not once per row), so a row costs the latent plus 8 bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tmpq.errors import TmpqError
from tmpq.sampling.conditioning import Conditioning, call_denoiser
from tmpq.sampling.ddim import DDIMSampler, generate
from tmpq.sampling.schedules import NoiseSchedule, make_timesteps

CALIBRATION_SEED = 1_000_000
"""Evaluation uses seeds 0.., so calibration trajectories start far away from them."""


@dataclass(frozen=True)
class CalibConfig:
    num_samples: int = 128  # trajectories
    num_steps: int = 20  # DDIM steps per trajectory; every step's input is kept
    schedule: str = "uniform"
    seed: int = CALIBRATION_SEED
    conditioning: str = ""  # sha256 of the prompt embeddings used (text-to-image); "" when unconditional

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.num_steps < 1:
            raise TmpqError("calibration needs num_samples >= 1 and num_steps >= 1")


@dataclass
class CalibrationSet:
    """Denoiser inputs (x_t, t[, prompt id]) for calibration; N = num_samples × num_steps rows."""

    x: torch.Tensor
    t: torch.Tensor
    config: CalibConfig
    cond_ids: torch.Tensor | None = None  # (N,) prompt id of each row (conditional models)
    cond_table: torch.Tensor | None = None  # (P, tokens, width) prompt embeddings, stored once

    def __len__(self) -> int:
        return self.x.shape[0]

    def cond(self, idx: torch.Tensor | slice) -> Conditioning | None:
        if self.cond_ids is None or self.cond_table is None:
            return None
        return Conditioning(self.cond_table, self.cond_ids[idx])

    def rows(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor, Conditioning | None]:
        """(x, t, cond) of the given rows: what the denoiser is called with."""
        return self.x[idx], self.t[idx], self.cond(idx)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, Conditioning | None]]:
        for i in range(0, len(self), batch_size):
            yield self.rows(slice(i, i + batch_size))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tensors = {"x": self.x.contiguous(), "t": self.t.contiguous()}
        if self.cond_ids is not None:
            tensors |= {"cond_ids": self.cond_ids.contiguous(), "cond_table": self.cond_table.contiguous()}
        save_file(tensors, str(tmp), metadata={"calib_config": json.dumps(asdict(self.config))})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        path = Path(path)
        if not path.is_file():
            raise TmpqError(f"calibration file {path} not found; create it with tmpq calibrate / collect_calibration")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise TmpqError(f"calibration file {path} is unreadable ({e}); re-create it") from None
        if set(tensors) not in ({"x", "t"}, {"x", "t", "cond_ids", "cond_table"}) or "calib_config" not in meta:
            raise TmpqError(f"{path} is not a tmpq calibration set (expected tensors x, t and calib_config metadata)")
        config = CalibConfig(**json.loads(meta["calib_config"]))
        return cls(tensors["x"], tensors["t"], config, tensors.get("cond_ids"), tensors.get("cond_table"))


class _Recorder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.xs: list[torch.Tensor] = []
        self.ts: list[torch.Tensor] = []
        self.cs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        self.xs.append(x.detach().cpu())
        self.ts.append(t.detach().cpu())
        if cond is not None:
            self.cs.append(cond.ids.cpu())
        return call_denoiser(self.model, x, t, cond)


@torch.no_grad()
def collect_calibration(
    model: nn.Module,
    schedule: NoiseSchedule,
    sample_shape: Sequence[int],
    config: CalibConfig = CalibConfig(),
    batch_size: int = 64,
    progress: bool = True,
    cond: Conditioning | None = None,
) -> CalibrationSet:
    """Run FP DDIM and keep the denoiser input of every step of every trajectory (trajectory i conditioned on
    `cond` entry i: give one per trajectory for a conditional model)."""
    if (cond is not None) != bool(config.conditioning):
        raise TmpqError("a conditional calibration needs both `cond` and config.conditioning (its digest)")
    if cond is not None and config.conditioning != cond.digest():
        raise TmpqError("config.conditioning is not the digest of the given prompt embeddings")
    rec = _Recorder(model)
    sampler = DDIMSampler(schedule, make_timesteps(config.schedule, config.num_steps, schedule.num_train_timesteps))
    generate(rec, sampler, config.num_samples, sample_shape, config.seed, batch_size, progress=progress, cond=cond)
    if cond is None:
        return CalibrationSet(torch.cat(rec.xs), torch.cat(rec.ts), config)
    return CalibrationSet(torch.cat(rec.xs), torch.cat(rec.ts), config, torch.cat(rec.cs), cond.table.detach().cpu())
