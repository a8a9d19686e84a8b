"""Runtime backends: integer kernels equal the fake-quantized layers, packed/fake backends equal the super-network
sampler bit for bit, missing kernels fall back with a warning, and export → load(dir).lower(backend) works."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

import tmpq
from tmpq.compressed import CompressedSampler
from tmpq.errors import TmpqError
from tmpq.quant import build_supernet
from tmpq.quant.primitives import pack_codes, unpack_codes
from tmpq.runtime import Backend, RuntimeFallbackWarning, RuntimeSampler, kernel_available, lower
from tmpq.runtime.layers import unpack_codes_torch
from tmpq.sampling.schedules import NoiseSchedule
from tmpq.search import SearchSpace

KERNEL_PARAMS = [
    pytest.param("onednn", marks=pytest.mark.skipif(not kernel_available("onednn"), reason="no oneDNN int8 here")),
    pytest.param("int_mm", marks=pytest.mark.skipif(not kernel_available("int_mm"), reason="no _int_mm on CPU")),
]


@pytest.fixture(scope="module")
def compressed(make_denoiser, calib, small_spec) -> CompressedSampler:
    """Two bit phases with mixed widths (4, 6 and 8-bit weights, split concat inputs) on 4 timesteps."""
    sn = build_supernet(make_denoiser(), calib, small_spec, progress=False)
    space = SearchSpace.from_supernet(sn, steps=(4,), phase_bounds=(500,))
    cand = space.random(random.Random(3))
    return CompressedSampler.from_candidate(sn, space, cand, NoiseSchedule(), (1, 32, 32))


def _layer_inputs(layer, gen: torch.Generator) -> torch.Tensor:
    if layer.kind == "conv":
        return torch.randn(3, layer.in_channels, 16, 16, generator=gen)
    return torch.randn(3, 5, layer.in_features, generator=gen)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_integer_kernels_equal_fake_quantized_layers(compressed, kernel):
    """Every layer variant, given the same input, matches its fake-quantized twin to float rounding."""
    rs = lower(compressed, Backend("int8", kernel=kernel, exact_rounding=True))
    sn = compressed.supernet
    gen = torch.Generator().manual_seed(0)
    checked = {"shifted": 0, "split": 0, "sub8": 0}
    for name, layer in rs.denoiser.layers.items():
        twin = sn.units[name]
        layer.in_channels = twin.base.weight.shape[1]
        layer.in_features = twin.base.weight.shape[1]
        for key, variant in layer.variants.items():
            assert variant.how == f"{kernel} int8 kernel" or key[1] is None
            x = _layer_inputs(layer, gen)
            twin.set_bits(*key)
            layer.active = key
            with torch.no_grad():
                ref, out = twin(x), layer(x)
            assert out.shape == ref.shape
            assert (out - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6, (name, key)
            kernels = getattr(variant, "kernels", [])
            checked["shifted"] += any(k.shifted for k in kernels)
            checked["split"] += len(kernels) == 2
            checked["sub8"] += key[0] is not None and key[0] < 8 and bool(kernels)
    sn.set_fp()
    assert all(checked.values()), checked  # the three exact-arithmetic paths were all exercised


def test_fake_and_packed_backends_are_bit_identical_to_the_supernet(compressed):
    ref = compressed.sample(4, seed=5, batch_size=2)
    for mode in ("fake", "packed"):
        out = lower(compressed, mode).sample(4, seed=5, batch_size=2)
        assert torch.equal(out, ref), mode
    assert torch.equal(compressed.sample(4, seed=5, batch_size=2), ref)  # lowering left the super-network as it was


def test_fast_rounding_moves_at_most_one_code_of_rare_activations(compressed):
    """PyTorch's fused quantizer rounds x/s + z where the search rounds x/s then adds z: they differ only on ties."""
    rs = lower(compressed, Backend("int8"))
    sn = compressed.supernet
    gen = torch.Generator().manual_seed(1)
    moved = total = 0
    for name, layer in rs.denoiser.layers.items():
        twin = sn.units[name]
        for key in layer.variants:
            if key[1] is None:
                continue
            w = twin.base.weight
            x = (
                torch.randn(4, w.shape[1], 16, 16, generator=gen)
                if w.ndim == 4
                else torch.randn(4, w.shape[1], generator=gen)
            )
            twin.set_bits(*key)
            layer.active = key
            with torch.no_grad():
                ref, out = twin(x), layer(x)
            step = float(twin.act.a8_scale.max() if key[1] == 8 else getattr(twin.act, f"a{key[1]}_scale").max())
            bound = step * twin.weight().abs().flatten(1).sum(1).max() + 1e-5  # one code moved under the whole kernel
            diff = (out - ref).abs()
            assert diff.max() <= bound, (name, key)
            moved += int((diff > 1e-4 * ref.abs().max()).sum())
            total += diff.numel()
    sn.set_fp()
    assert moved <= 1e-3 * total


def test_int8_sampler_stays_close_to_the_fake_quantized_one(compressed, calib):
    fake = lower(compressed, "fake").denoiser
    int8 = lower(compressed, Backend("int8", exact_rounding=True)).denoiser
    x = calib.x[:6]
    for t in compressed.timesteps:
        tt = torch.full((6,), t)
        a, b = fake(x, tt), int8(x, tt)
        # every layer is exact (test above), but a different float summation order (integer kernels, channels-last
        # float convs) puts rare activations on the other side of a rounding boundary and the flipped code
        # propagates through ~60 quantizers of this random model: 1-4 % mean deviation at mid t; a wrong scale or
        # zero point anywhere would be ~100 % (the built-in model's FID on both backends: README, issue 8 table)
        assert (a - b).abs().mean() < 0.1 * a.abs().mean(), t


def test_memory_shrinks_with_packed_and_int8(compressed):
    fake, packed, int8 = (lower(compressed, m) for m in ("fake", "packed", "int8"))
    assert packed.memory_bytes() < int8.memory_bytes() < fake.memory_bytes()
    s = int8.summary()
    assert s["memory_bytes"] == int8.memory_bytes()
    assert sum(v for k, v in s["mac_share"].items() if "int8 kernel" in k) > 0.6
    assert 0 < s["bitops_fraction_of_fp_same_steps"] < 1


@pytest.mark.parametrize("bits", range(1, 9))
def test_torch_unpack_equals_the_numpy_primitive(bits):
    codes = torch.randint(0, 2**bits, (37, 5), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack_codes_torch(packed, bits, codes.numel()).reshape(codes.shape), codes)
    assert torch.equal(unpack_codes(packed, bits, tuple(codes.shape)), codes)


def test_missing_kernel_falls_back_with_a_warning(compressed, monkeypatch):
    monkeypatch.setattr(Backend, "int_kernel", lambda self: None)
    with pytest.warns(RuntimeFallbackWarning, match="no integer kernel"):
        rs = lower(compressed, "int8")
    assert all(row["runs"].startswith("float") for row in rs.plan)
    assert torch.equal(rs.sample(2, seed=1), compressed.sample(2, seed=1))  # the same arithmetic, only slower


def test_bf16_backend_is_close_to_fp32(compressed, calib):
    fp32, bf16 = lower(compressed, "int8").denoiser, lower(compressed, Backend("int8", dtype="bfloat16")).denoiser
    x, t = calib.x[:4], torch.full((4,), compressed.timesteps[0])
    a, b = fp32(x, t), bf16(x, t)
    assert b.dtype == torch.float32
    # bf16 keeps ~3 significant digits, about one 8-bit step of a layer's range: activations rounded to bf16
    # before quantization land on neighbouring codes far more often than in fp32 (5 % mean deviation on this
    # random model); a broken cast would be ~100 %
    assert (a - b).abs().mean() < 0.1 * a.abs().mean()


def test_bad_backends_get_clear_errors(compressed):
    with pytest.raises(TmpqError, match="mode must be one of"):
        Backend("int4")
    with pytest.raises(TmpqError, match="dtype must be one of"):
        Backend("int8", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(TmpqError, match="no CUDA device"):
            Backend("int8", device="cuda")


def test_load_with_backend(compressed, tmp_path):
    out = compressed.export(tmp_path / "exp")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeFallbackWarning)
        rs = tmpq.load(out).lower("packed", inplace=True)
    assert isinstance(rs, RuntimeSampler)
    assert torch.equal(rs.sample(3, seed=2), compressed.sample(3, seed=2))
    assert rs.timesteps == compressed.timesteps and rs.bitops() == compressed.bitops()
    assert isinstance(tmpq.load(out), CompressedSampler)  # no backend: the super-network sampler, as before


def test_loaded_runtime_keeps_no_super_network(compressed, tmp_path, monkeypatch):
    """What `memory_bytes` reports is what stays: the super-network and its twins are released after lowering."""
    import gc
    import weakref

    from tmpq.runtime import lowering as lower_module

    seen = []
    real = lower_module.lower

    def spy(sampler, backend, inplace=False):
        seen.append(weakref.ref(sampler.supernet))
        return real(sampler, backend, inplace)

    monkeypatch.setattr(lower_module, "lower", spy)
    rs = tmpq.load(compressed.export(tmp_path / "exp")).lower("int8", inplace=True)
    gc.collect()
    assert seen and seen[0]() is None
    assert rs.sample(1, seed=0).shape == (1, 1, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_int8_backend_matches_cpu(compressed, calib):
    cpu = lower(compressed, "fake").denoiser
    gpu = lower(compressed, Backend("int8", device="cuda")).denoiser
    x, t = calib.x[:32], torch.full((32,), compressed.timesteps[0])
    a, b = cpu(x, t), gpu(x.cuda(), t.cuda()).cpu()
    assert (a - b).abs().mean() < 0.03 * a.abs().mean()


def test_cli_sample_on_a_backend(compressed, tmp_path):
    from typer.testing import CliRunner

    from tmpq.cli import app

    exp = compressed.export(tmp_path / "exp")
    grid = tmp_path / "grid.png"
    res = CliRunner().invoke(
        app, ["sample", "--compressed", str(exp), "--backend", "int8", "--num-samples", "4", "--out", str(grid)]
    )
    assert res.exit_code == 0, res.output
    assert grid.is_file() and "int8 kernel" in res.output and "KB resident" in res.output
    res = CliRunner().invoke(app, ["sample", "--compressed", str(exp), "--backend", "int4", "--out", str(grid)])
    assert res.exit_code != 0 and "mode must be one of" in res.output


@pytest.mark.parametrize("m, padded", [(1, 32), (16, 32), (17, 32), (24, 32), (32, 32), (33, 64), (64, 64)])
def test_int_mm_rows_are_padded_to_a_multiple_of_32(m, padded):
    """The rows CUDA's _int_mm was measured to accept; the padding adds rows at the zero point, sliced off after."""
    from tmpq.runtime.kernels import int_mm_row_pad

    assert m + int_mm_row_pad(m) == padded


@pytest.mark.skipif(not kernel_available("int_mm"), reason="no _int_mm on CPU")
@pytest.mark.parametrize("m", [1, 17, 24, 40])
def test_padded_int_mm_is_exact_at_any_row_count(m):
    from tmpq.runtime.kernels import IntMMLinear, IntWeight

    g = torch.Generator().manual_seed(m)
    w = torch.randint(-128, 128, (24, 16), generator=g, dtype=torch.int8)
    q = torch.randint(0, 256, (m, 16), generator=g, dtype=torch.uint8)
    lin = IntMMLinear(IntWeight(w, torch.ones(24), None), None, 1.0, 3)
    ref = (q.int() - 3) @ w.int().t()
    assert torch.equal(lin.matmul(q), ref)


def test_packed_weights_stay_on_the_codes_device():
    from tmpq.runtime.layers import _Weight

    codes = torch.randint(0, 16, (4, 3), dtype=torch.uint8)
    w = _Weight(codes, torch.ones(4), torch.zeros(4), 4, (4, 3), "packed", torch.float32)
    assert w.packed.device == codes.device and torch.equal(w.get(), codes.float())
