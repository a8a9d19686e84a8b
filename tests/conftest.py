"""Shared tiny models: the suite never needs the shipped weights except to test the shipped files."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from tmpq.sampling.schedules import NoiseSchedule


def tiny_unet_config() -> dict:
    return {
        "sample_size": 32,
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": 1,
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 4,
        "attention_head_dim": 8,
    }


@pytest.fixture
def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**tiny_unet_config()).eval()


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule()


@pytest.fixture(scope="session")
def make_tiny_unet():
    """Factory: identical tiny UNets for a given seed (tests that compare two independently built copies)."""

    def make(seed: int = 0) -> UNet2DModel:
        with torch.random.fork_rng():  # seeded init that leaves the global RNG as it was
            torch.manual_seed(seed)
            return UNet2DModel(**tiny_unet_config()).eval()

    return make
