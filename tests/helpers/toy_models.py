"""`package.module:factory` models for the loading tests (tests/helpers is on sys.path, see pyproject)."""

from __future__ import annotations

import torch
from torch import nn

from tmpq.sampling.schedules import NoiseSchedule


class TinyDenoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * (t.float().view(-1, 1, 1, 1) / 1000)


def tiny():
    return TinyDenoiser(), NoiseSchedule(), (1, 8, 8)


def bad():
    return 3
