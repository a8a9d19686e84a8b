"""Timestep-aware calibration data (as Q-Diffusion): denoiser inputs gathered along FP sampling runs.

Quantization ranges must fit the activations of every timestep, and those drift a lot from t = T to
t = 0, so the inputs x_t are recorded at every step of full-precision DDIM trajectories spread over the
whole schedule. The calibration noise uses its own seed range, disjoint from evaluation seeds.

A text-to-image model is calibrated on its prompts: every row also records the id of its prompt, and the
prompt embeddings are stored once (not once per row), so a row costs the latent plus 8 bytes.

Memory: collection writes rows into one preallocated tensor (no second copy when it ends), and a saved set is
reopened with `CalibrationSet.open`, which reads the x_t rows from the file batch by batch when they are used:
calibrating a large model then holds one batch of calibration inputs, not all of them, next to the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tmpq.errors import TmpqError
from tmpq.sampling.conditioning import Conditioning, call_denoiser
from tmpq.sampling.ddim import DDIMSampler, generate
from tmpq.sampling.schedules import NoiseSchedule
from tmpq.serialization import DictConfig

CALIBRATION_SEED = 1_000_000
"""Evaluation uses seeds 0.., so calibration trajectories start far away from them."""


@dataclass(frozen=True)
class CalibConfig(DictConfig):
    num_samples: int = 128  # trajectories
    num_steps: int = 20  # DDIM steps per trajectory; every step's input is kept
    schedule: str = "uniform"
    seed: int = CALIBRATION_SEED
    conditioning: str = ""  # sha256 of the prompt embeddings used (text-to-image); "" when unconditional
    model: str = ""  # fingerprint of the weights the inputs were collected from (set by prepare_supernet)

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.num_steps < 1:
            raise TmpqError("calibration needs num_samples >= 1 and num_steps >= 1")


class FileRows:
    """Rows of one tensor of a safetensors file, read on demand: `rows[a:b]`, `rows[index_tensor]`, `.shape`."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = Path(path), name
        with safe_open(str(self.path), framework="pt") as fh:
            self.shape = tuple(fh.get_slice(name).get_shape())

    def __getitem__(self, idx: slice | torch.Tensor) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt") as fh:
            rows = fh.get_slice(self.name)
            if isinstance(idx, slice):
                return rows[idx]
            idx = torch.as_tensor(idx)
            idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.flatten()
            if not len(idx):
                return rows[0:0]
            return torch.cat([rows[int(i) : int(i) + 1] for i in idx])


@dataclass
class CalibrationSet:
    """Denoiser inputs (x_t, t[, prompt id]) for calibration; N = num_samples × num_steps rows. `x` is a tensor,
    or `FileRows` read batch by batch from the saved file (`CalibrationSet.open`)."""

    x: torch.Tensor | FileRows
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

    def rows(
        self, idx: torch.Tensor | slice, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Conditioning | None]:
        """(x, t, cond) of the given rows: what the denoiser is called with, on `device` (the set stays on the CPU,
        or in its file, and only the rows in use move)."""
        x, t, cond = self.x[idx], self.t[idx], self.cond(idx)
        if device is None:
            return x, t, cond
        return x.to(device), t.to(device), None if cond is None else cond.to(device)

    def batches(
        self, batch_size: int, device: torch.device | str | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, Conditioning | None]]:
        for i in range(0, len(self), batch_size):
            yield self.rows(slice(i, i + batch_size), device)

    def save(self, path: str | Path) -> None:
        if isinstance(self.x, FileRows):
            raise TmpqError(f"this calibration set is read from {self.x.path}; it is saved already")
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
        """The whole set in memory."""
        return cls._read(Path(path), lazy=False)

    @classmethod
    def open(cls, path: str | Path) -> CalibrationSet:
        """The set with its x_t rows left in the file and read when used (t, prompt ids and embeddings are small)."""
        return cls._read(Path(path), lazy=True)

    @classmethod
    def _read(cls, path: Path, lazy: bool) -> CalibrationSet:
        if not path.is_file():
            raise TmpqError(f"calibration file {path} not found; create it with tmpq calibrate / collect_calibration")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                names = set(fh.keys())
                if names not in ({"x", "t"}, {"x", "t", "cond_ids", "cond_table"}) or "calib_config" not in meta:
                    raise TmpqError(
                        f"{path} is not a tmpq calibration set (expected tensors x, t and calib_config metadata)"
                    )
                small = {k: fh.get_tensor(k) for k in names - {"x"}}
            x = FileRows(path, "x") if lazy else load_file(str(path))["x"]
        except (SafetensorError, OSError) as e:
            raise TmpqError(f"calibration file {path} is unreadable ({e}); re-create it") from None
        config = CalibConfig(**json.loads(meta["calib_config"]))
        return cls(x, small["t"], config, small.get("cond_ids"), small.get("cond_table"))


class _Recorder(nn.Module):
    """Writes every denoiser input into preallocated rows: one copy of the data, never a list to concatenate."""

    def __init__(self, model: nn.Module, rows: int, shape: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.x = torch.empty((rows, *shape))
        self.t = torch.empty(rows, dtype=torch.long)
        self.c = torch.zeros(rows, dtype=torch.long)
        self.n = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        n, b = self.n, x.shape[0]
        self.x[n : n + b] = x.detach().cpu()
        self.t[n : n + b] = t.detach().cpu()
        if cond is not None:
            self.c[n : n + b] = cond.ids.cpu()
        self.n += b
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
    sampler = DDIMSampler(schedule, schedule.timesteps(config.schedule, config.num_steps))
    rec = _Recorder(model, config.num_samples * len(sampler), sample_shape)
    generate(rec, sampler, config.num_samples, sample_shape, config.seed, batch_size, progress=progress, cond=cond)
    if cond is None:
        return CalibrationSet(rec.x, rec.t, config)
    return CalibrationSet(rec.x, rec.t, config, rec.c, cond.table.detach().cpu())
