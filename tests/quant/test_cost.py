from __future__ import annotations

import pytest
import torch
from torch import nn

from tmpq.errors import TmpqError
from tmpq.quant import CalibConfig, CalibrationSet, QuantConfig, QuantSpec, build_supernet


class TwoLayer(nn.Module):
    """conv 1->4 (3x3, same padding) on 8x8, then linear 256->10: MACs easy to count by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)  # not quantizable: its 8 parameters stay FP
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def two_layer():
    torch.manual_seed(0)
    calib = CalibrationSet(torch.randn(32, 1, 8, 8), torch.zeros(32, dtype=torch.long), CalibConfig())
    return build_supernet(TwoLayer(), calib, QuantSpec(pin=(), reconstruction=None), progress=False)


def test_macs_counted_per_layer(two_layer):
    units = two_layer.cost.units
    assert set(units) == {"conv", "fc"}
    assert units["conv"].macs == 8 * 8 * 4 * (1 * 3 * 3)  # outputs x (C_in x kh x kw)
    assert units["fc"].macs == 10 * 256
    assert two_layer.cost.other_params == 8


def test_bitops_hand_computed(two_layer):
    cost = two_layer.cost
    c = QuantConfig.from_mapping({"conv": (4, 8), "fc": (2, 6)})
    assert cost.bitops(c, steps=3) == 3 * (2304 * 4 * 8 + 2560 * 2 * 6)
    assert cost.bitops(None, steps=10) == 10 * (2304 + 2560) * 32 * 32
    fp_layer = QuantConfig.from_mapping({"conv": (None, None), "fc": (8, 8)})
    assert cost.bitops(fp_layer, steps=1) == 2304 * 32 * 32 + 2560 * 64
    # size: weights at their width, biases and the norm at 32 bits
    assert cost.size_bits(c) == 36 * 4 + 4 * 32 + 2560 * 2 + 10 * 32 + 8 * 32
    assert cost.size_bits(None) == (36 + 4 + 2560 + 10 + 8) * 32


def test_bitops_errors(two_layer):
    with pytest.raises(TmpqError, match="no bits"):
        two_layer.cost.bitops(QuantConfig.from_mapping({"conv": (4, 8)}), steps=1)
    with pytest.raises(TmpqError, match="steps"):
        two_layer.cost.bitops(None, steps=0)


def test_matmul_bitops_use_activation_bits_squared(make_denoiser, calib, small_spec):
    sn = build_supernet(make_denoiser(), calib, small_spec, progress=False)
    qk = [n for n in sn.units if n.endswith("processor.qk")]
    assert qk, "the tiny UNet has attention: its q·kᵀ matmuls must be units"
    u = sn.cost.units[qk[0]]
    # tiny UNet: attention at 16x16 = 256 tokens, 16 channels: 256 * 256 * 16 MACs for q·kᵀ
    assert u.kind == "matmul" and u.macs == 256 * 256 * 16
    c6, c8 = sn.uniform_config(8, 6), sn.uniform_config(8, 8)
    delta = sn.cost.bitops(c8, 1) - sn.cost.bitops(c6, 1)
    expect = sum(
        v.macs * (64 - 36) if v.kind == "matmul" else v.macs * 8 * 2
        for n, v in sn.cost.units.items()
        if n not in sn.pinned
    )
    assert delta == expect
