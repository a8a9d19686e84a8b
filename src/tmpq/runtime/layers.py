"""Frozen runtime layers: what a quantized twin becomes once its bit-widths are fixed for deployment.

A `RuntimeLayer` replaces one Conv2d/Linear twin of the super-network. It keeps only the widths the sampler
uses (one variant per (w, a) pair across its timestep phases), executed one of three ways:

- `IntVariant`: an integer kernel (kernels.py) — real int8 arithmetic, output equal to the fake-quantized layer
  up to float rounding; weights resident as int8 (1 byte each).
- `DequantVariant(resident="float")`: the fake-quantized computation of the search, with the dequantized weight
  kept in float (bit-identical to the super-network in fp32).
- `DequantVariant(resident="packed")`: the same numbers, but the weight stays bit-packed at its width in memory
  (a 4-bit layer holds half a byte per weight) and is unpacked and dequantized at each call: memory for speed.
- `Fp8Variant`: float8 e4m3 weights and activations on `torch._scaled_mm` (super-networks whose 8-bit candidates
  are fp8), output equal to the fake-quantized layer up to float rounding; weights resident as e4m3 (1 byte).

Kernel tensors are plain attributes, not buffers, so casting the model to bf16 never touches integer codes or
scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tmpq.quant.layers import dequantize_weight
from tmpq.quant.primitives import fake_quantize_, fp8_fake_quantize, pack_codes
from tmpq.runtime.kernels import (
    Fp8Conv,
    Fp8Linear,
    IntMMConv,
    IntMMLinear,
    IntWeight,
    OneDNNConv,
    OneDNNLinear,
    _nbytes,
    quantize_act,
)


@dataclass(frozen=True)
class ActRange:
    """One activation width's per-part (scale, zero point), parts being the halves of a split concat input."""

    bits: int
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    fp8: bool = False  # float8 e4m3 with these scales (zero points 0) instead of integer codes


def _parts(x: torch.Tensor, split: int | None) -> list[torch.Tensor]:
    return [x] if split is None else list(x.split([split, x.shape[1] - split], dim=1))


def unpack_codes_torch(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """`quant.primitives.unpack_codes` in torch ops (no numpy round trip): n uint8 codes from an MSB-first stream."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bitstream = (packed.unsqueeze(1) >> shifts).bitwise_and_(1).reshape(-1)[: n * bits].reshape(n, bits)
    weights = (1 << torch.arange(bits - 1, -1, -1, device=packed.device)).to(torch.int32)
    return (bitstream.to(torch.int32) * weights).sum(1).to(torch.uint8)


class _Weight:
    """A quantized weight kept resident as float (dequantized once) or as packed codes (dequantized per call)."""

    def __init__(self, codes, scale, zp, bits: int, shape, resident: str, dtype: torch.dtype, fmt: str = "int") -> None:
        self.shape, self.bits, self.resident, self.dtype, self.fmt = tuple(shape), bits, resident, dtype, fmt
        self.scale, self.zp = scale.float(), zp.float()
        if resident == "packed":
            self.packed = pack_codes(codes, bits).to(codes.device)  # packed on the host: bring it back
            self.value = None
        else:
            self.packed = None
            self.value = self._dequant(codes)

    def _dequant(self, codes: torch.Tensor) -> torch.Tensor:
        return dequantize_weight(codes.reshape(self.shape), self.scale, self.zp, self.fmt).to(self.dtype)

    def get(self) -> torch.Tensor:
        if self.value is not None:
            return self.value
        n = 1
        for s in self.shape:
            n *= s
        return self._dequant(unpack_codes_torch(self.packed, self.bits, n))

    def nbytes(self) -> int:
        return _nbytes(self.value, self.packed, self.scale, self.zp)


class DequantVariant:
    """Fake-quantized activations, float matmul/conv with a dequantized (or full-precision) weight."""

    how = "float"

    def __init__(self, layer: RuntimeLayer, weight, act: ActRange | None, dtype: torch.dtype) -> None:
        self.layer, self.weight, self.act, self.dtype = layer, weight, act, dtype
        self._fp8_scales: dict[torch.device, list[torch.Tensor]] = {}  # made once per device, not per call
        if isinstance(weight, _Weight):
            self.how = "packed codes, dequantized per call" if weight.resident == "packed" else "float (dequantized)"
        else:
            self.how = "float (full-precision weight)"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = x.float().clone()
            for i, part in enumerate(_parts(x, self.layer.split)):
                if self.act.fp8:
                    part.copy_(fp8_fake_quantize(part, self._fp8_scale(i, part.device)))
                else:
                    fake_quantize_(part, self.act.scales[i], self.act.zero_points[i], self.act.bits)
        w = self.weight.get() if isinstance(self.weight, _Weight) else self.weight
        y = self.layer.compute(x.to(self.dtype), w.to(self.dtype))
        if self.layer.channels_last and y.dim() == 4:  # e.g. a 1-channel input gives NCHW whatever the weight
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def _fp8_scale(self, i: int, device: torch.device) -> torch.Tensor:
        """Part i's activation scale as a tensor on `device`: the fake quantizer's arithmetic, bit for bit."""
        if device not in self._fp8_scales:
            self._fp8_scales[device] = [torch.tensor(s, device=device) for s in self.act.scales]
        return self._fp8_scales[device][i]

    def nbytes(self) -> int:
        return self.weight.nbytes() if isinstance(self.weight, _Weight) else _nbytes(self.weight)


class IntVariant:
    """Integer kernels, one per input part; each part quantized with its own range, outputs summed."""

    def __init__(self, kernels: list, act: ActRange, bits: int, name: str, dtype: torch.dtype, exact: bool) -> None:
        self.kernels, self.act, self.bits, self.dtype, self.exact = kernels, act, bits, dtype, exact
        self.how = f"{name} int8 kernel"

    def __call__(self, x: torch.Tensor, split: int | None) -> torch.Tensor:
        out = None
        for i, (part, k) in enumerate(zip(_parts(x, split), self.kernels)):
            q = quantize_act(part, self.act.scales[i], self.act.zero_points[i], self.act.bits, self.exact)
            y = k.raw(q, self.dtype)
            out = y if out is None else out.add_(y)
        return self.kernels[0].finish(out)  # the parts share one shift correction: applied once, to the sum

    def nbytes(self) -> int:
        return sum(k.nbytes() for k in self.kernels)


class Fp8Variant:
    """Float8 kernels (`Fp8Linear` / `Fp8Conv`), one per input part, each with its own activation scale and the
    matching slice of the weight; outputs summed (the bias is in the first part's kernel only)."""

    how = "fp8 e4m3 kernel (torch._scaled_mm)"

    def __init__(self, kernels: list, dtype: torch.dtype) -> None:
        self.kernels, self.dtype = kernels, dtype

    def __call__(self, x: torch.Tensor, split: int | None) -> torch.Tensor:
        out = None
        for part, k in zip(_parts(x, split), self.kernels):
            y = k.raw(part, torch.float32)
            out = y if out is None else out.add_(y)
        return out.to(self.dtype)

    def nbytes(self) -> int:
        return sum(k.nbytes() for k in self.kernels)


class RuntimeLayer(nn.Module):
    """A Conv2d or Linear with fixed quantization variants; `active` picks the current step's (w, a)."""

    def __init__(self, name: str, base: nn.Module, split: int | None) -> None:
        super().__init__()
        self.name, self.split = name, split
        self.kind = "conv" if isinstance(base, nn.Conv2d) else "linear"
        if self.kind == "conv":
            self.conv = {
                "kernel_size": tuple(base.kernel_size),
                "stride": tuple(base.stride),
                "padding": tuple(base.padding),
                "dilation": tuple(base.dilation),
                "groups": int(base.groups),
            }
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.variants: dict[tuple[int | None, int | None], object] = {}
        self.active: tuple[int | None, int | None] | None = None
        self.channels_last = False

    def compute(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.kind == "conv":
            c = self.conv
            return F.conv2d(x, w, b, c["stride"], c["padding"], c["dilation"], c["groups"])
        return F.linear(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.variants[self.active]
        return v(x, self.split) if isinstance(v, (IntVariant, Fp8Variant)) else v(x)

    def nbytes(self) -> int:
        """Bytes this layer keeps resident for its variants (weights, kernels, biases, scales)."""
        return sum(v.nbytes() for v in self.variants.values()) + _nbytes(self.bias)

    def add_int_variant(
        self, key, codes, scale, zp, act: ActRange, kernel: str, dtype: torch.dtype, exact: bool = False
    ) -> None:
        bias = self.bias
        kernels = []
        offsets = [0] if self.split is None else [0, self.split]
        ends = [codes.shape[1]] if self.split is None else [self.split, codes.shape[1]]
        shift = any(IntWeight.needs_shift(codes[:, lo:hi], zp) for lo, hi in zip(offsets, ends))
        for i, (lo, hi) in enumerate(zip(offsets, ends)):
            w = IntWeight.from_codes(codes[:, lo:hi], scale, zp, shift)
            b = bias if i == 0 else None
            if kernel == "onednn":
                k = (
                    OneDNNConv(w, b, act.scales[i], act.zero_points[i], self.conv)
                    if self.kind == "conv"
                    else (OneDNNLinear(w, b, act.scales[i], act.zero_points[i]))
                )
            else:
                k = (
                    IntMMConv(w, b, act.scales[i], act.zero_points[i], self.conv)
                    if self.kind == "conv"
                    else (IntMMLinear(w, b, act.scales[i], act.zero_points[i]))
                )
            kernels.append(k)
        self.variants[key] = IntVariant(kernels, act, key[0], kernel, dtype, exact)

    def add_fp8_variant(self, key, codes, scale, act: ActRange, dtype: torch.dtype) -> None:
        """`codes`: the layer's e4m3 weight bit patterns (uint8) with their per-output-channel `scale`."""
        offsets = [0] if self.split is None else [0, self.split]
        ends = [codes.shape[1]] if self.split is None else [self.split, codes.shape[1]]
        kernels = []
        for i, (lo, hi) in enumerate(zip(offsets, ends)):
            part, bias = codes[:, lo:hi].contiguous(), self.bias if i == 0 else None
            if self.kind == "conv":
                kernels.append(Fp8Conv(part, scale, bias, act.scales[i], self.conv))
            else:
                kernels.append(Fp8Linear(part, scale, bias, act.scales[i]))
        self.variants[key] = Fp8Variant(kernels, dtype)

    def add_dequant_variant(self, key, weight, act: ActRange | None, dtype: torch.dtype) -> None:
        self.variants[key] = DequantVariant(self, weight, act, dtype)

    def to_channels_last(self) -> None:
        """Float conv weights in channels-last, so a float layer (e.g. a full-precision conv_in) keeps the layout
        the int8 kernels want instead of handing NCHW activations to every layer after it."""
        if self.kind != "conv":
            return
        self.channels_last = True
        for v in self.variants.values():
            if isinstance(v, DequantVariant):
                w = v.weight
                if isinstance(w, _Weight) and w.value is not None:
                    w.value = w.value.contiguous(memory_format=torch.channels_last)
                elif isinstance(w, torch.Tensor):
                    v.weight = w.contiguous(memory_format=torch.channels_last)
