"""Bias-corrected rounding: codes whose per-channel error on the mean input cancels, within one step of nearest."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tmpq.quant import QuantSpec, build_supernet
from tmpq.quant.bias_correction import balance_codes, input_mean_shape_ok, sum_input
from tmpq.quant.primitives import affine_qparams, channel_view, dequantize, qmax, quantize


def _offset(w, codes, scale, zp, mean):
    wq = dequantize(codes, channel_view(scale, w.ndim), channel_view(zp, w.ndim))
    return ((wq - w).reshape(w.shape[0], -1) * mean).sum(1)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_balanced_codes_cancel_the_offset_within_one_step_of_nearest(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 8, 3, 3, generator=g)
    mean = torch.rand(8 * 9, generator=g) + 0.2  # post-SiLU inputs: positive means, the case that biases ε̂
    flat = w.reshape(16, -1)
    scale, zp = affine_qparams(flat.min(1).values, flat.max(1).values, bits)
    nearest = quantize(w, channel_view(scale, 4), channel_view(zp, 4), bits)
    fixed = balance_codes(w, nearest, scale, zp, bits, mean)
    assert fixed.dtype == nearest.dtype and fixed.shape == nearest.shape
    assert (fixed.int() - nearest.int()).abs().max() <= 1 and int(fixed.max()) <= qmax(bits)
    before, after = _offset(w, nearest, scale, zp, mean).abs(), _offset(w, fixed, scale, zp, mean).abs()
    assert (after <= before + 1e-6).all()
    # one flip moves the offset by at most max(s * mean): what is left is below that, far below the nearest offset
    assert (after <= scale * mean.max() + 1e-6).all() and after.sum() < 0.5 * before.sum()
    # the extra weight error is the least needed: far below the nearest rounding's own
    err = lambda c: (dequantize(c, channel_view(scale, 4), channel_view(zp, 4)) - w).pow(2).sum()  # noqa: E731
    assert err(fixed) < 1.5 * err(nearest)


def test_a_channel_without_offset_is_left_alone():
    w = torch.tensor([[0.3, -0.3, 0.1, -0.1]])
    scale, zp = torch.tensor([0.2]), torch.tensor([8.0])
    codes = quantize(w, scale[:, None], zp[:, None], 4)
    assert torch.equal(balance_codes(w, codes, scale, zp, 4, torch.ones(4)), codes)  # errors already cancel


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 5, 3, padding=1),
        nn.Conv2d(3, 5, 3, stride=2, padding=1),
        nn.Conv2d(3, 5, (3, 1), padding=(2, 0), dilation=2),
        nn.Conv2d(3, 5, 1),
    ],
)
def test_conv_input_sums_equal_the_unfolded_input(conv):
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(0))
    total, n = sum_input(conv, x)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    assert n == cols.shape[0] * cols.shape[2]
    assert torch.allclose(total, cols.sum((0, 2)), atol=1e-4)
    lin = nn.Linear(8, 4)
    total, n = sum_input(lin, x)
    assert n == 2 * 3 * 9 and torch.allclose(total, x.reshape(-1, 8).sum(0))


def test_only_layers_it_can_describe_are_corrected():
    assert input_mean_shape_ok(nn.Conv2d(2, 2, 3, padding=1)) and input_mean_shape_ok(nn.Linear(2, 2))
    assert not input_mean_shape_ok(nn.Conv2d(2, 2, 3, groups=2))
    assert not input_mean_shape_ok(nn.Conv2d(2, 2, 3, padding="same"))
    assert not input_mean_shape_ok(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


def _mean_output_error(sn, calib, bits: int) -> float:
    """Σ over weight layers and channels of |E[y_q − y]| with only that layer's weights at `bits`, on FP inputs."""
    inputs: dict[str, list] = {}
    units = {n: u for n, u in sn.units.items() if hasattr(u, "apply_weight") and bits in u.w_candidates}
    hooks = [
        u.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0])) for n, u in units.items()
    ]
    sn.set_fp()
    with torch.no_grad():
        for x, t, _ in calib.batches(64):
            sn(x, t)
    for h in hooks:
        h.remove()
    total = 0.0
    for n, u in units.items():
        x = torch.cat(inputs[n])
        w = u.base.weight.detach()
        with torch.no_grad():
            d = u.apply_weight(x, u.dequantized_weight(bits)) - u.apply_weight(x, w)
        dims = [i for i in range(d.ndim) if i != (1 if u.kind == "conv" else d.ndim - 1)]
        total += float(d.mean(dims).abs().sum())
    return total


@pytest.fixture(scope="module")
def pair(make_denoiser, calib, small_spec):
    nearest = build_supernet(make_denoiser(), calib, replace(small_spec, bias_correction=False), progress=False)
    corrected = build_supernet(make_denoiser(), calib, small_spec, progress=False)
    return nearest, corrected


def test_corrected_supernet_has_smaller_mean_output_errors_at_every_width(pair, calib, small_spec):
    nearest, corrected = pair
    assert small_spec.bias_correction  # the default
    assert corrected.calibration_info["bias_correction"]["layers"] > 0
    for bits in small_spec.w_bits:
        before, after = _mean_output_error(nearest, calib, bits), _mean_output_error(corrected, calib, bits)
        assert after < 0.5 * before, (bits, before, after)


def test_corrected_codes_are_saved_and_reloaded(pair, probe, make_denoiser, tmp_path):
    from tmpq.quant.persistence import load_supernet, save_supernet

    _, sn = pair
    cfg = sn.uniform_config(6, 8)
    sn.set_config(cfg)
    with torch.no_grad():
        y = sn(*probe)
    save_supernet(sn, tmp_path)
    again = load_supernet(tmp_path, make_denoiser())
    assert again.spec.bias_correction
    again.set_config(cfg)
    with torch.no_grad():
        assert torch.equal(again(*probe), y)


def test_specs_recorded_before_bias_correction_read_as_nearest_rounding():
    old = QuantSpec().to_dict()
    del old["bias_correction"]
    assert QuantSpec.from_dict(old).bias_correction is False
    assert QuantSpec.from_dict(QuantSpec().to_dict()) == QuantSpec()
    off = replace(QuantSpec(), bias_correction=False)
    assert QuantSpec.from_dict(off.to_dict()) == off
