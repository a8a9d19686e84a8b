"""Conditioning for a batch of samples: ids into a table of (prompt) embeddings.

A conditional denoiser is called as `eps = model(x_t, t, cond)`; an unconditional one as `model(x_t, t)`.
`cond` carries integer ids (one per sample) and the embedding table they index, so calibration data
records 8 bytes per row instead of a (tokens × width) embedding, and a class-conditional factory model can
read the ids directly as labels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tmpq.errors import TmpqError


@dataclass(frozen=True, eq=False)
class Conditioning:
    """`ids` (B,) long into `table` (P, ...): sample i is conditioned on `table[ids[i]]`."""

    table: torch.Tensor
    ids: torch.Tensor

    def __post_init__(self) -> None:
        if self.ids.ndim != 1 or self.ids.dtype != torch.long:
            raise TmpqError("conditioning ids must be a 1-D long tensor")
        if len(self.ids) and (int(self.ids.min()) < 0 or int(self.ids.max()) >= len(self.table)):
            raise TmpqError(f"conditioning ids must lie in [0, {len(self.table)}); got {self.ids.tolist()[:8]}")

    @classmethod
    def cycle(cls, table: torch.Tensor, num_samples: int) -> Conditioning:
        """Sample i gets entry i mod P: every prompt is used, evenly, in a fixed order."""
        if len(table) < 1:
            raise TmpqError("the conditioning table is empty; give at least one prompt")
        return cls(table, torch.arange(num_samples) % len(table))

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, start: int, stop: int) -> Conditioning:
        return Conditioning(self.table, self.ids[start:stop])

    def to(self, device: torch.device | str) -> Conditioning:
        """The embeddings table on `device` (the ids index it from anywhere)."""
        return Conditioning(self.table.to(device), self.ids)

    def embeddings(self) -> torch.Tensor:
        return self.table[self.ids]

    def digest(self) -> str:
        """sha256 of the table: ties calibration data and reference samples to the exact prompts used."""
        t = self.table.detach().cpu().contiguous()
        return hashlib.sha256(
            f"{t.dtype}|{tuple(t.shape)}".encode() + t.view(torch.uint8).numpy().tobytes()
        ).hexdigest()


def call_denoiser(model: Callable, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None) -> torch.Tensor:
    """`model(x, t)` for unconditional models (every existing denoiser), `model(x, t, cond)` otherwise."""
    return model(x, t) if cond is None else model(x, t, cond)
