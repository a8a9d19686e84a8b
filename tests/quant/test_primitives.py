from __future__ import annotations

import pytest
import torch

from tmpq.errors import TmpqError
from tmpq.quant.primitives import affine_qparams, dequantize, fake_quantize, fake_quantize_, qmax, quantize, sqnr_db


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_within_half_step_inside_range(bits):
    x = torch.linspace(-1.3, 2.1, 1001)
    scale, zp = affine_qparams(x.min(), x.max(), bits)
    codes = quantize(x, scale, zp, bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= qmax(bits)
    err = (dequantize(codes, scale, zp) - x).abs()
    assert float(err.max()) <= float(scale) / 2 + 1e-6
    assert torch.equal(dequantize(codes, scale, zp), fake_quantize(x, scale, zp, bits))


def test_zero_is_exact_and_clipping_saturates():
    scale, zp = affine_qparams(torch.tensor(0.5), torch.tensor(3.0), 4)  # range widened to contain 0
    assert float(fake_quantize(torch.tensor(0.0), scale, zp, 4)) == 0.0
    assert float(fake_quantize(torch.tensor(100.0), scale, zp, 4)) == pytest.approx(3.0, abs=float(scale))


def test_degenerate_range_does_not_divide_by_zero():
    scale, zp = affine_qparams(torch.tensor(0.0), torch.tensor(0.0), 4)
    assert torch.isfinite(fake_quantize(torch.zeros(3), scale, zp, 4)).all()


@pytest.mark.parametrize("bits", [0, 9, 16])
def test_unsupported_bits_rejected(bits):
    with pytest.raises(TmpqError, match="not supported"):
        qmax(bits)


def test_sqnr():
    x = torch.randn(1000)
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x + 0.1 * torch.randn(1000)) == pytest.approx(20, abs=1.0)


@pytest.mark.parametrize("bits", [4, 8])
def test_in_place_fast_path_is_bit_identical_to_reference_and_torch(bits):
    x = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(3)) * 3
    scale, zp = affine_qparams(x.min(), x.max() * 0.7, bits)
    ref = fake_quantize(x, scale, zp, bits)
    assert torch.equal(fake_quantize_(x.clone(), scale, zp, bits), ref)
    torch_fq = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), 0, qmax(bits))
    assert torch.equal(torch_fq, ref)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_codes_round_trips_exactly_and_is_dense(bits):
    from tmpq.quant.primitives import pack_codes, unpack_codes

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (7, 3, 3, 3), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (codes.numel() * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, tuple(codes.shape)), codes)


def test_pack_codes_rejects_codes_too_wide_and_wrong_lengths():
    from tmpq.quant.primitives import pack_codes, unpack_codes

    with pytest.raises(TmpqError, match="does not fit in 3 bits"):
        pack_codes(torch.tensor([9], dtype=torch.uint8), 3)
    with pytest.raises(TmpqError, match="expected"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, (10,))
