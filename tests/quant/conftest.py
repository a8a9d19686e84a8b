"""A tiny UNet denoiser and its calibration set, shared by the quantization tests (built once per module)."""

from __future__ import annotations

import pytest
import torch

from tmpq.models.denoiser import UNetDenoiser
from tmpq.quant import CalibConfig, CalibrationSet, QuantSpec, collect_calibration
from tmpq.sampling.schedules import NoiseSchedule


@pytest.fixture(scope="session")
def small_spec() -> QuantSpec:
    """Fewer candidates than the defaults: the same code paths, a quarter of the calibration time."""
    return QuantSpec(w_bits=(4, 6, 8), a_bits=(6, 8))


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
