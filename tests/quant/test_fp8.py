"""Float8 e4m3 as the 8-bit candidate format (QuantSpec.format8): the primitives, a super-network whose 8-bit
weights and activations are e4m3, reconstruction that leaves them alone, export → load, and the fp8 runtime backend
equal to the fake-quantized sampler to float rounding (torch._scaled_mm runs on CPU builds too)."""

from __future__ import annotations

import random
import warnings
from dataclasses import replace

import pytest
import torch

import tmpq
from tmpq.compressed import CompressedSampler
from tmpq.errors import TmpqError
from tmpq.quant import QuantSpec, build_supernet
from tmpq.quant.primitives import (
    FP8_DTYPE,
    FP8_MAX,
    channel_view,
    fp8_dequantize,
    fp8_fake_quantize,
    fp8_quantize,
    fp8_scale,
    quantize,
)
from tmpq.runtime import Backend, RuntimeFallbackWarning, lower
from tmpq.runtime.kernels import fp8_available
from tmpq.sampling.schedules import NoiseSchedule
from tmpq.search import SearchSpace

needs_fp8 = pytest.mark.skipif(not fp8_available("cpu"), reason="this PyTorch build has no CPU fp8 matmul")


@pytest.fixture(scope="module")
def fp8_spec(small_spec) -> QuantSpec:
    return replace(small_spec, format8="fp8_e4m3")


@pytest.fixture(scope="module")
def fp8_net(make_denoiser, calib, fp8_spec):
    return build_supernet(make_denoiser(), calib, fp8_spec, progress=False)


@pytest.fixture(scope="module")
def fp8_sampler(fp8_net) -> CompressedSampler:
    """Two phases on 4 timesteps, one all-fp8 (W8A8), one mixing fp8 with 4/6-bit integer layers."""
    space = SearchSpace.from_supernet(fp8_net, steps=(4,), phase_bounds=(500,))
    cand = space.random(random.Random(5))
    s = CompressedSampler.from_candidate(fp8_net, space, cand, NoiseSchedule(), (1, 32, 32))
    phases = (fp8_net.uniform_config(8, 8), *s.phase_configs[1:])
    return CompressedSampler(fp8_net, s.schedule, s.timesteps, phases, s.phase_bounds, s.sample_shape, s.eta)


def test_fp8_primitives_round_to_e4m3_and_saturate():
    x = torch.tensor([0.0, 1.0, -3.0, 1.0625, 1000.0, -1e6, 0.013])
    scale = torch.tensor(1.0)
    codes = fp8_quantize(x, scale)
    assert codes.dtype == torch.uint8
    back = fp8_dequantize(codes, scale)
    assert back[:3].tolist() == [0.0, 1.0, -3.0]  # representable values are exact
    assert back[3] == 1.0 and back[4] == FP8_MAX and back[5] == -FP8_MAX  # 3 mantissa bits; saturated, not inf
    assert torch.equal(fp8_fake_quantize(x, scale), back)
    assert torch.equal(back, x.to(FP8_DTYPE).float().clamp(-FP8_MAX, FP8_MAX))
    w = torch.randn(16, 64)
    s = fp8_scale(w.abs().amax(1))[:, None]
    rel = (fp8_dequantize(fp8_quantize(w, s), s) - w).norm() / w.norm()
    assert rel < 0.04  # e4m3's relative precision: 2^-4 at worst, ~2 % RMS


def test_fp8_supernet_holds_e4m3_codes_and_keeps_integer_widths(fp8_net, make_denoiser, calib, small_spec, probe):
    unit = next(u for u in fp8_net.units.values() if hasattr(u, "weight_codes") and u.w_candidates == (4, 6, 8))
    assert unit.weight_format(8) == "fp8_e4m3" and unit.weight_format(4) == "int"
    codes, scale, zp = unit.weight_codes(8)
    w = unit.base.weight.detach()
    expected = (w / scale.reshape(-1, *[1] * (w.ndim - 1))).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    assert torch.equal(codes, expected.view(torch.uint8)) and not zp.any()
    assert float(unit.act.a8_zp.abs().max()) == 0.0
    int_net = build_supernet(make_denoiser(), calib, small_spec, progress=False)
    for name in ("w4", "w6"):  # integer widths are untouched by the format of the 8-bit one
        assert torch.equal(getattr(unit, f"{name}_codes"), getattr(int_net.units[unit.name], f"{name}_codes"))
    x, t = probe
    with torch.no_grad():
        fp8_net.set_fp()
        ref = fp8_net(x, t)
        errs = {}
        for label, net in (("fp8", fp8_net), ("int8", int_net)):
            net.set_config(net.uniform_config(8, 8))
            errs[label] = float((net(x, t) - ref).pow(2).mean() / ref.pow(2).mean())
            net.set_fp()
    assert 0 < errs["fp8"] < 0.05 and 0 < errs["int8"] < 0.05  # both are close 8-bit approximations
    assert errs["fp8"] != errs["int8"]


@pytest.mark.parametrize("method", ["adaround", "brecq"])
def test_reconstruction_learns_integer_widths_only(make_denoiser, calib, fp8_spec, fp8_net, method):
    """e4m3 has no integer rounding to learn: its codes stay the nearest ones, the integer widths move."""
    # learning starts from nearest rounding here, so any learned code shows as a move
    spec = replace(fp8_spec, reconstruction=method, recon_iters=20, recon_batch=2, recon_rows=4, bias_correction=())
    sn = build_supernet(make_denoiser(), calib, spec, progress=False)
    moved = 0
    for name, unit in sn.units.items():
        if hasattr(unit, "weight_codes") and unit.w_candidates == (4, 6, 8):
            assert torch.equal(unit.weight_codes(8).codes, fp8_net.units[name].weight_codes(8).codes)
            codes, scale, zp = unit.weight_codes(4)
            w = unit.base.weight.detach().float()
            nearest = quantize(w, channel_view(scale, w.ndim), channel_view(zp, w.ndim), 4)
            moved += not torch.equal(codes, nearest)
    assert moved
    with pytest.raises(TmpqError, match="format8"):
        QuantSpec(format8="fp4")


@needs_fp8
def test_fp8_backend_runs_the_fake_quantized_sampler(fp8_sampler, calib, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rs = lower(fp8_sampler, Backend("fp8"))
    assert "fp8 e4m3 kernel (torch._scaled_mm)" in {row["runs"] for row in rs.plan}
    assert any(issubclass(w.category, RuntimeFallbackWarning) for w in caught)  # the integer widths run as fake
    fake = lower(fp8_sampler, "fake").denoiser
    x = calib.x[:6]
    for t in fp8_sampler.timesteps:
        tt = torch.full((6,), t)
        a, b = fake(x, tt), rs.denoiser(x, tt)
        # each fp8 layer equals its twin to float rounding (test below); a value that float summation order moves
        # across an e4m3 rounding boundary moves by 1/16 (3 mantissa bits) and propagates through the random
        # model's quantizers: a few % mean deviation. A wrong scale anywhere would be ~100 %
        assert (a - b).abs().mean() < 0.1 * a.abs().mean(), t
    reference = fp8_sampler.sample(3, seed=1)
    with pytest.warns(RuntimeFallbackWarning, match="float8 layer"):  # int8 kernels cannot run e4m3 layers
        lower(fp8_sampler, Backend("int8"))
    assert torch.equal(lower(fp8_sampler, Backend("fake")).sample(3, seed=1), reference)
    assert torch.equal(lower(fp8_sampler, Backend("packed")).sample(3, seed=1), reference)
    loaded = tmpq.load(fp8_sampler.export(tmp_path / "exp"))
    assert loaded.supernet.spec.format8 == "fp8_e4m3"
    assert torch.equal(loaded.sample(3, seed=1), reference)
    with pytest.warns(RuntimeFallbackWarning):
        again = loaded.lower("fp8", inplace=True)
    assert torch.equal(again.sample(3, seed=1), rs.sample(3, seed=1))


@needs_fp8
def test_fp8_kernels_equal_their_fake_layers(fp8_sampler):
    """Every all-fp8 layer variant (linear and conv, split concat inputs included) equals its twin to rounding."""
    rs = lower(fp8_sampler, Backend("fp8"))
    sn = fp8_sampler.supernet
    gen = torch.Generator().manual_seed(0)
    checked = {"conv": 0, "linear": 0, "split": 0}
    for name, layer in rs.denoiser.layers.items():
        twin = sn.units[name]
        for key, variant in layer.variants.items():
            if "fp8" not in variant.how:
                continue
            w = twin.base.weight
            x = torch.randn(2, w.shape[1], 8, 8, generator=gen) if w.ndim == 4 else torch.randn(2, 5, w.shape[1])
            twin.set_bits(*key)
            layer.active = key
            with torch.no_grad():
                ref, out = twin(x), layer(x)
            twin.set_bits(None, None)
            assert (out - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())
            checked[layer.kind] += 1
            checked["split"] += layer.split is not None
    assert checked["conv"] and checked["split"]


@needs_fp8
def test_auto_backend_picks_the_kernel_for_the_format(fp8_sampler, make_denoiser, calib, small_spec):
    rs = lower(fp8_sampler, Backend("auto"))
    assert rs.backend.mode == "fp8" and any("fp8" in row["runs"] for row in rs.plan)
    from tmpq.runtime import kernel_available

    net = build_supernet(make_denoiser(), calib, small_spec, progress=False)
    s = CompressedSampler(net, NoiseSchedule(), [900, 500], [net.uniform_config(8, 8)], (), (1, 32, 32))
    ri = lower(s, Backend("auto"))
    has_int = kernel_available("onednn") or kernel_available("int_mm")
    assert ri.backend.mode == ("int8" if has_int else "fake")
    assert any("int8 kernel" in row["runs"] for row in ri.plan) == has_int
