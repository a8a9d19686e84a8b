"""Pure uniform-affine quantization math: no modules, no state, so every other part reuses one definition.

Codes are unsigned integers in [0, 2**bits - 1]; `x ≈ (code - zero_point) * scale`. As in PyTorch's
quantization kernels, x is multiplied by 1/scale and rounded half to even, so a stored code, the
reference `fake_quantize` and the fast in-place `fake_quantize_fast` agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tmpq.errors import TmpqError

MAX_BITS = 8
"""Codes are stored as uint8; wider integers would need another storage type."""

_EPS = 1e-8


def qmax(bits: int) -> int:
    if not 1 <= bits <= MAX_BITS:
        raise TmpqError(f"bit-width {bits} is not supported; use 1..{MAX_BITS} bits (or full precision)")
    return 2**bits - 1


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point that map [lo, hi] (widened to contain 0) onto [0, 2**bits - 1]."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / qmax(bits)).clamp(min=_EPS)
    zero_point = torch.round(-lo / scale).clamp(0, qmax(bits))
    return scale, zero_point


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as uint8) of `x`; scale/zero_point broadcast against x."""
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, 0, qmax(bits)).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (codes.to(scale.dtype) - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """dequantize(quantize(x)) without materialising codes: the float value a quantized layer really sees."""
    return (torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, 0, qmax(bits)) - zero_point) * scale


def fake_quantize_(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """`fake_quantize` in place on x (one pass of in-place ops: ~10x faster on CPU than
    torch.fake_quantize_per_tensor_affine, which also writes a gradient mask). Returns x."""
    return x.mul_(1.0 / scale).round_().add_(zero_point).clamp_(0, qmax(bits)).sub_(zero_point).mul_(scale)


def fused_qparams(
    scales: Sequence[float],
    zero_points: Sequence[int],
    split: int | None,
    channels: int,
    device: torch.device | str,
) -> tuple:
    """What `fake_quantize_fused` takes, made once per switch: the per-tensor range as Python numbers or, with
    `split`, one range for channels [:split] and another for the rest as per-channel tensors on `device` (so the
    sampling loop copies nothing to the device)."""
    if split is None:
        return float(scales[0]), int(zero_points[0])
    rest = channels - split
    s = torch.tensor([scales[0]] * split + [scales[1]] * rest, dtype=torch.float32, device=device)
    z = torch.tensor([zero_points[0]] * split + [zero_points[1]] * rest, dtype=torch.int32, device=device)
    return s, z


def fake_quantize_fused(x: torch.Tensor, qparams: tuple, bits: int) -> torch.Tensor:
    """`fake_quantize` as one PyTorch kernel (same arithmetic: round(x · (1/s)) + z, clamped, back to float) with
    `fused_qparams`'s range. One launch instead of six in-place ops: what a GPU wants (each launch costs more than
    the work); on a CPU the in-place chain is faster."""
    scale, zp = qparams
    if isinstance(scale, float):
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, qmax(bits))
    return torch.fake_quantize_per_channel_affine(x, scale, zp, 1, 0, qmax(bits))


FORMATS_8BIT = ("int8", "fp8_e4m3")
"""What an 8-bit candidate is: affine integer codes, or scaled float8 e4m3 (what Hopper and Ada GPUs multiply at
twice the bf16 rate; their int8 path is slower than bf16). Narrower widths are always integer."""
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448: the largest finite e4m3 value


def width_format(bits: int | None, fp8: bool) -> str:
    """The number format of a candidate width: 'fp8_e4m3' for the 8-bit one of an fp8 super-network, else 'int'."""
    return "fp8_e4m3" if fp8 and bits == 8 else "int"


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The scale that maps |x| <= amax onto e4m3's finite range (per tensor or per channel)."""
    return (amax.float() / FP8_MAX).clamp(min=_EPS)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The e4m3 bit patterns (as uint8, so they store and pack like integer codes) of x / scale, saturated to
    ±448 and rounded to nearest even, as PyTorch's cast rounds."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(torch.uint8)


def fp8_dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.view(FP8_DTYPE).to(scale.dtype) * scale


def fp8_fake_quantize(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """fp8_dequantize(fp8_quantize(x)) without storing codes; same arithmetic, so bit-identical to it."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float().mul(scale).to(x.dtype)


def channel_view(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) per-output-channel parameters reshaped to broadcast over a weight of `ndim` dims."""
    return scale.reshape(-1, *([1] * (ndim - 1)))


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better), as torchao's tests use it."""
    reference, approx = reference.detach().double(), approx.detach().double()
    noise = (reference - approx).pow(2).sum()
    signal = reference.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes of `bits` bits densely into a flat uint8 tensor (ceil(n * bits / 8) bytes), most
    significant bit first: what makes a 4-bit layer take half the bytes of an 8-bit one on disk."""
    qmax(bits)
    flat = codes.detach().reshape(-1).to(torch.uint8).cpu().numpy()
    if flat.size and int(flat.max()) >= 1 << bits:
        raise TmpqError(f"a code does not fit in {bits} bits; these codes were not made for this width")
    bitplanes = np.unpackbits(flat[:, None], axis=1)[:, 8 - bits :]  # (n, bits), MSB first
    return torch.from_numpy(np.packbits(bitplanes.reshape(-1)).copy())


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 codes of the given shape."""
    qmax(bits)
    n = int(np.prod(shape)) if shape else 1
    need = (n * bits + 7) // 8
    data = packed.detach().reshape(-1).cpu().numpy()
    if data.size != need:
        raise TmpqError(f"packed codes hold {data.size} bytes, {need} expected for {n} codes of {bits} bits")
    bitplanes = np.unpackbits(data)[: n * bits].reshape(n, bits)
    full = np.zeros((n, 8), dtype=np.uint8)
    full[:, 8 - bits :] = bitplanes
    return torch.from_numpy(np.packbits(full, axis=1).reshape(shape).copy())
