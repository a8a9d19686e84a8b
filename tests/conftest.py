"""Shared tiny models: the suite never needs the shipped weights except to test the shipped files."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import UNet2DModel

from tmpq.allocator import keep_freed_memory
from tmpq.models.denoiser import UNetDenoiser
from tmpq.quant import CalibConfig, CalibrationSet, QuantSpec, collect_calibration
from tmpq.sampling.schedules import NoiseSchedule

keep_freed_memory()  # as the command line does: the suite samples a lot (tmpq.allocator)


def _share_cores_among_workers() -> None:
    """Under pytest-xdist (`make test` runs `-n auto`), each worker takes its share of the cores, and so do the
    processes its tests spawn (CLI runs, search workers): two workers at two threads each on two cores run slower
    than one."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


_share_cores_among_workers()


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


# --- a tiny denoiser and its calibration set, shared by the quantization, search and export tests ---


@pytest.fixture(scope="session")
def small_spec() -> QuantSpec:
    """Fewer candidates than the defaults and range-only (reconstruction has tests of its own): the same code paths,
    a fraction of the calibration time."""
    return QuantSpec(w_bits=(4, 6, 8), a_bits=(6, 8), reconstruction=None)


@pytest.fixture(scope="session")
def make_denoiser(make_tiny_unet):
    def make(seed: int = 0) -> UNetDenoiser:
        return UNetDenoiser(make_tiny_unet(seed))

    return make


@pytest.fixture(scope="session")
def calib(make_denoiser) -> CalibrationSet:
    return collect_calibration(
        make_denoiser(), NoiseSchedule(), (1, 32, 32), CalibConfig(num_samples=6, num_steps=4), progress=False
    )


@pytest.fixture(scope="session")
def probe(calib: CalibrationSet) -> tuple[torch.Tensor, torch.Tensor]:
    """A few calibration inputs at different timesteps, to compare model outputs on."""
    g = torch.Generator().manual_seed(7)
    idx = torch.randperm(len(calib), generator=g)[:4]
    return calib.x[idx], calib.t[idx]
