"""Integer matmul/conv kernels that compute a quantized layer *exactly* as the fake-quantized model does.

A layer quantized by tmpq computes y = s_x · s_w[o] · Σ (q_x − z_x)(q_w − z_w[o]) + b, with uint8 activation
codes q_x (any width ≤ 8, zero point z_x) and per-channel asymmetric weight codes q_w (any width ≤ 8, zero
point z_w). Two kernels run that sum in integers with an fp32 (or bf16) output, so no output requantization is
added:

- `onednn`: PyTorch's x86 oneDNN int8 conv/linear (`torch.ops.onednn.qconv2d_pointwise`, the ops Inductor's
  x86 int8 path uses). It takes uint8 activations with a zero point but only *symmetric* int8 weights, so the
  weight operand is q_w − z_w (fits int8 for widths ≤ 7) or, for 8-bit layers whose q_w − z_w leaves int8,
  q_w − 128 plus an exact rank-one correction (128 − z_w[o]) · Σ_window(q_x − z_x).
- `int_mm`: `torch._int_mm` (int8 × int8 → int32; CPU and CUDA), with activations shifted to q_x − 128 and both
  corrections added in int32; convolutions go through unfold (im2col), which is slow on CPU and fine on GPUs.

Both are tested against the fake-quantized reference. For super-networks whose 8-bit candidates are float8 e4m3
(`QuantSpec.format8`), `Fp8Linear` / `Fp8Conv` run the 8-bit layers on `torch._scaled_mm` (Hopper and Ada GPUs; CPU
builds emulate it). Every function here is pure: modules live in layers.py.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tmpq.quant.primitives import FP8_DTYPE, FP8_MAX

KERNELS = ("onednn", "int_mm")


PROBE_K = 64
"""Input channels of the oneDNN probe: 64 products of 255 · 127 sum to 2,072,640 exactly; summed in int16 pairs
they saturate at 32 · 32,767."""


@functools.cache
def kernel_available(kernel: str, device: str = "cpu") -> bool:
    """Whether `kernel` runs on `device` type in this PyTorch build and sums its products exactly (probed once on a
    tiny problem with the largest operands tmpq gives it).

    oneDNN's int8 convolution and linear layers on x86 CPUs without VNNI (AVX2-only, such as some AMD EPYC) add
    pairs of uint8 · int8 products in int16 (vpmaddubsw), which saturates: measured there, 64 products of 255 · 127
    summed to 1,048,544 instead of 2,072,640, and the 8-bit output layer of a test model was off by 10 % of its
    range. On such CPUs oneDNN is not available to tmpq, whose int8 backend must equal the fake-quantized model."""
    try:
        if kernel == "onednn":
            if device != "cpu" or not torch.backends.mkldnn.is_available():
                return False
            w = torch.full((8, PROBE_K, 1, 1), 127, dtype=torch.int8)
            pw = torch.ops.onednn.qconv_prepack(w, torch.ones(8), 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
            x = torch.full((1, PROBE_K, 2, 2), 255, dtype=torch.uint8)
            y = torch.ops.onednn.qconv2d_pointwise(
                x, 1.0, 0, pw, torch.ones(8), torch.zeros(8, dtype=torch.long), None,
                [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip
            return bool(y.flatten()[0] == 255 * 127 * PROBE_K)
        if kernel == "int_mm":
            a = torch.ones(32, 32, dtype=torch.int8, device=device)
            return bool(torch._int_mm(a, a)[0, 0].item() == 32)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return False


def quantize_act(x: torch.Tensor, scale: float, zero_point: int, bits: int, exact: bool = False) -> torch.Tensor:
    """uint8 codes of x.

    `exact`: rounded as `quant.primitives.quantize` (round(x · (1/s)) + z, half to even), the search's arithmetic.
    Otherwise PyTorch's fused per-tensor quantizer (4-5x faster on CPU), which rounds x · (1/s) + z in float: the two
    differ by one code only where x · (1/s) is within float rounding of a .5 tie (about 1 activation in 10^6).
    Codes of narrower widths are clamped to 2**bits − 1 afterwards, as the reference clamps.
    """
    if not exact and hasattr(torch, "quantize_per_tensor"):
        try:
            with warnings.catch_warnings():  # torch marks its quantized tensor types deprecated; we only borrow codes
                warnings.simplefilter("ignore")
                qt = torch.quantize_per_tensor(x.float(), scale, zero_point, torch.quint8)
            # its codes as a plain uint8 tensor on the same storage (int_repr() would copy them)
            q = torch.empty(0, dtype=torch.uint8, device=qt.device)
            q.set_(qt.untyped_storage(), qt.storage_offset(), qt.shape, qt.stride())
            return q if bits == 8 else q.clamp_(0, 2**bits - 1)
        except (RuntimeError, NotImplementedError):  # a device or build without it: the exact path below
            pass
    q = x.float().mul(1.0 / scale).round_().add_(zero_point).clamp_(0, 2**bits - 1)
    return q.to(torch.uint8)


@dataclass(frozen=True)
class IntWeight:
    """A layer's weight as the int8 operand an integer kernel multiplies, plus what makes the product exact.

    `values` = q_w − z_w when that fits int8 (then `shift` is None); otherwise q_w − 128 with
    `shift` = 128 − z_w (float, per output channel), whose product with the input's window sum is added back.
    """

    values: torch.Tensor  # int8, the weight's shape
    scale: torch.Tensor  # (O,) float32
    shift: torch.Tensor | None  # (O,) float32 or None

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, shift: bool | None = None
    ) -> IntWeight:
        """`shift` None: only when q_w − z_w leaves int8; True/False forces it (the parts of a split layer agree)."""
        if shift is None:
            shift = cls.needs_shift(codes, zero_point)
        if not shift:
            zp = zero_point.reshape(-1, *([1] * (codes.ndim - 1))).to(torch.int32)
            return cls((codes.to(torch.int32) - zp).to(torch.int8), scale.float().contiguous(), None)
        shifted = (codes.to(torch.int32) - 128).to(torch.int8)
        return cls(shifted, scale.float().contiguous(), (128 - zero_point.float()).contiguous())

    @staticmethod
    def needs_shift(codes: torch.Tensor, zero_point: torch.Tensor) -> bool:
        centred = codes.to(torch.int32) - zero_point.reshape(-1, *([1] * (codes.ndim - 1))).to(torch.int32)
        return int(centred.min()) < -128 or int(centred.max()) > 127


def _with_sum_rows(w: IntWeight, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For a shifted weight: extra output channels, the first all ones, so the kernel itself returns
    s_x · Σ_window(q_x − z_x) (exact integer accumulation) as output channel O, from which the shift correction is
    one fused multiply-add. The extra rows pad O to a multiple of 16: oneDNN's int8 kernels work in blocks of 16
    channels and fall back to a ~9x slower path for other counts (measured on a 32-channel 3x3 conv)."""
    if w.shift is None:
        return w.values, w.scale, bias
    o = w.values.shape[0]
    extra = 16 - o % 16
    rows = torch.zeros(extra, *w.values.shape[1:], dtype=torch.int8)
    rows[0] = 1
    values = torch.cat([w.values, rows])
    scale = torch.cat([w.scale, torch.ones(extra)])
    if bias is not None:
        bias = torch.cat([bias.detach().float(), torch.zeros(extra)])
    return values, scale, bias


def _apply_shift(y: torch.Tensor, o: int, corr: torch.Tensor) -> torch.Tensor:
    """y[:, :o] + y[:, o] · corr, computed on the channels-last (…, C) layout oneDNN returns: one pass, and the
    result is a dense channels-last tensor (a strided channel slice would make every later op copy it)."""
    if y.dim() == 4:
        yn = y.permute(0, 2, 3, 1)
        return torch.addcmul(yn[..., :o], yn[..., o : o + 1], corr).permute(0, 3, 1, 2)
    return torch.addcmul(y[..., :o], y[..., o : o + 1], corr)


class _OneDNNKernel:
    """What oneDNN's int8 conv and linear share: the weight with its sum rows, prepacked by `_prepack`, the float
    bias, the shift correction applied by `finish`."""

    def __init__(self, w: IntWeight, bias, x_scale: float, x_zp: int) -> None:
        self.x_scale, self.x_zp = float(x_scale), int(x_zp)
        self.out_channels, self.shifted = w.values.shape[0], w.shift is not None
        values, self.scale, bias = _with_sum_rows(w, bias)
        self.packed = self._prepack(values.contiguous())
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self._zeros = torch.zeros(values.shape[0], dtype=torch.long)
        self.corr = None if w.shift is None else w.scale * w.shift

    def _prepack(self, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def raw(self, q: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The layer's output from the raw kernel output (or the sum of a split layer's parts' raw outputs)."""
        return y if self.corr is None else _apply_shift(y, self.out_channels, self.corr.to(y.dtype))

    def __call__(self, q: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return self.finish(self.raw(q, out_dtype))

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + _nbytes(self.bias, self.scale, self.corr)


class OneDNNConv(_OneDNNKernel):
    """A prepacked oneDNN int8 convolution for one (weight, activation range) pair; works in channels-last."""

    def __init__(self, w: IntWeight, bias, x_scale: float, x_zp: int, conv: dict) -> None:
        self.conv = conv
        super().__init__(w, bias, x_scale, x_zp)

    def _prepack(self, values: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return torch.ops.onednn.qconv_prepack(
            values, self.scale, self.x_scale, self.x_zp,
            list(c["stride"]), list(c["padding"]), list(c["dilation"]), c["groups"], None,
        )  # fmt: skip

    def raw(self, q: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        c = self.conv
        if not q.is_contiguous(memory_format=torch.channels_last):
            q = q.contiguous(memory_format=torch.channels_last)  # NCHW input costs oneDNN a ~7x slower reorder
        bias = None if self.bias is None else self.bias.to(out_dtype)
        return torch.ops.onednn.qconv2d_pointwise(
            q, self.x_scale, self.x_zp, self.packed, self.scale, self._zeros, bias,
            list(c["stride"]), list(c["padding"]), list(c["dilation"]), c["groups"], 1.0, 0, out_dtype, "none", [], "",
        )  # fmt: skip


class OneDNNLinear(_OneDNNKernel):
    """A prepacked oneDNN int8 linear layer (input (..., K) → (..., N))."""

    def _prepack(self, values: torch.Tensor) -> torch.Tensor:
        return torch.ops.onednn.qlinear_prepack(values, None)

    def raw(self, q: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(out_dtype)
        return torch.ops.onednn.qlinear_pointwise(
            q, self.x_scale, self.x_zp, self.packed, self.scale, self._zeros, bias, 1.0, 0, out_dtype, "none", [], ""
        )


def int_mm_exact(q: torch.Tensor, x_zp: int, w: IntWeight) -> torch.Tensor:
    """Σ_k (q_x − z_x)(q_w − z_w) as int32, for q (M, K) uint8 and w.values (N, K) int8, through torch._int_mm.

    _int_mm takes int8 × int8, so activations are shifted to q_x − 128 and the exact product restored with the
    column sums of the weight (and, for shifted 8-bit weights, the row sums of the activations).
    """
    a = (q.to(torch.int16) - 128).to(torch.int8)
    wt = w.values.t().contiguous()
    acc = torch._int_mm(a, wt)  # Σ (q_x − 128) w
    acc += (128 - x_zp) * w.values.sum(1, dtype=torch.int32)  # → Σ (q_x − z_x) w
    if w.shift is not None:
        rows = q.sum(1, keepdim=True, dtype=torch.int32) - q.shape[1] * x_zp
        acc += rows * w.shift.to(torch.int32)  # w = q_w − 128: add (128 − z_w) Σ (q_x − z_x)
    return acc


INT_MM_ROWS = 32
"""cuBLASLt's int8 matmul behind CUDA's _int_mm refuses some row counts that are multiples of 8 (measured on an
H200: M = 24 with N = 24, K = 16, and M = 17 for every N >= 32, fail with CUBLAS_STATUS_NOT_SUPPORTED, while M in
32, 64, 128, 1024 pass for every K, N in 8..64): rows are padded to a multiple of 32 on every device, one rule."""


def int_mm_row_pad(m: int) -> int:
    """Rows of padding that bring an M-row _int_mm operand to a positive multiple of INT_MM_ROWS."""
    return max(INT_MM_ROWS, -(-m // INT_MM_ROWS) * INT_MM_ROWS) - m


class IntMMLinear:
    """Linear layer on torch._int_mm (CPU or CUDA)."""

    def __init__(self, w: IntWeight, bias, x_scale: float, x_zp: int) -> None:
        # CUDA's _int_mm wants K, N multiples of 8 (and M padded, see INT_MM_ROWS): the weight gets zero rows (extra
        # outputs, sliced off) and zero columns (matched by activation columns at the zero point: they add nothing)
        values = w.values.reshape(w.values.shape[0], -1)
        self.n, self.k = values.shape
        values = F.pad(values, (0, (-self.k) % 8, 0, (-self.n) % 8))
        shift = None if w.shift is None else F.pad(w.shift, (0, (-self.n) % 8))
        self.w = IntWeight(values, w.scale, shift)
        self.x_scale, self.x_zp = float(x_scale), int(x_zp)
        self.shifted = w.shift is not None
        self.bias = None if bias is None else bias.detach().float()
        self.out_scale = self.x_scale * w.scale

    def matmul(self, q2d: torch.Tensor) -> torch.Tensor:
        """Σ_k (q_x − z_x)(q_w − z_w) for q2d (M, K) uint8 → (M, N) int32."""
        m = q2d.shape[0]
        rows = int_mm_row_pad(m)
        cols = self.w.values.shape[1] - self.k
        if rows or cols:
            q2d = F.pad(q2d, (0, cols, 0, rows), value=self.x_zp)
        return int_mm_exact(q2d, self.x_zp, self.w)[:m, : self.n]

    def finish(self, y: torch.Tensor) -> torch.Tensor:  # the corrections are already in the int32 accumulator
        return y

    def __call__(self, q: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return self.raw(q, out_dtype)

    def raw(self, q: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        lead = q.shape[:-1]
        y = self.matmul(q.reshape(-1, q.shape[-1])).float() * self.out_scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, -1).to(out_dtype)

    def nbytes(self) -> int:
        return self.w.values.numel() + _nbytes(self.bias, self.w.scale, self.w.shift)


class IntMMConv(IntMMLinear):
    """Convolution as unfold (im2col) + torch._int_mm; groups must be 1."""

    def __init__(self, w: IntWeight, bias, x_scale: float, x_zp: int, conv: dict) -> None:
        super().__init__(w, bias, x_scale, x_zp)
        self.conv = conv

    def raw(self, q: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        # unfold pads with 0, which must mean a real zero: unfold the centred codes (exact in float up to 2^24)
        cols, shape = im2col(q.float() - self.x_zp, self.conv)
        y = self.matmul((cols + self.x_zp).to(torch.uint8)).float() * self.out_scale
        if self.bias is not None:
            y = y + self.bias
        return col2im(y, shape).to(out_dtype)


def im2col(x: torch.Tensor, conv: dict) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A convolution's input windows as rows: (B·Ho·Wo, C·kh·kw), zero-padded, and (B, Ho, Wo) for `col2im`."""
    c = conv
    b, _, h, w = x.shape
    kh, kw = c["kernel_size"]
    ho = (h + 2 * c["padding"][0] - c["dilation"][0] * (kh - 1) - 1) // c["stride"][0] + 1
    wo = (w + 2 * c["padding"][1] - c["dilation"][1] * (kw - 1) - 1) // c["stride"][1] + 1
    cols = F.unfold(x, (kh, kw), c["dilation"], c["padding"], c["stride"])  # (B, K, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]), (b, ho, wo)


def col2im(y: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(B·Ho·Wo, N) rows of a convolution's output back to (B, N, Ho, Wo)."""
    b, ho, wo = shape
    return y.reshape(b, ho * wo, -1).transpose(1, 2).reshape(b, -1, ho, wo)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


FP8_PAD = 16
"""cuBLASLt's fp8 matmul wants K and N multiples of 16; rows are padded the same way (zeros add nothing)."""


@functools.cache
def fp8_available(device: str = "cpu") -> bool:
    """Whether `torch._scaled_mm` multiplies float8 e4m3 on this device type (CPU builds do, in software; CUDA needs
    compute capability 8.9+: Ada, Hopper)."""
    try:
        a = torch.ones(16, 16, device=device).to(FP8_DTYPE)
        one = torch.tensor(1.0, device=device)
        y = torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        return bool(y[0, 0].item() == 16)
    except (RuntimeError, AttributeError, NotImplementedError, TypeError):
        return False


class Fp8Linear:
    """A linear layer on `torch._scaled_mm` with float8 e4m3 weights (per-output-channel scale) and activations
    (per-tensor scale), as the fp8 super-network computes it: y = s_x · s_w[o] · Σ x8 · w8 + b, accumulated in fp32.

    The matmul is scaled per tensor (supported on every fp8 device and output dtype) and the per-channel weight
    scale is applied to its fp32 output, so the result equals the fake-quantized layer up to float rounding."""

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, bias, x_scale: float) -> None:
        values = codes.reshape(codes.shape[0], -1)
        self.n, self.k = values.shape
        pad_k, pad_n = (-self.k) % FP8_PAD, (-self.n) % FP8_PAD
        self.w = F.pad(values, (0, pad_k, 0, pad_n)).view(FP8_DTYPE).t()  # (K, N), column-major as cuBLASLt wants
        self.x_scale = float(x_scale)
        self.one = torch.tensor(1.0, device=codes.device)
        self.sx = torch.tensor(self.x_scale, device=codes.device)
        self.out_scale = w_scale.float().contiguous()
        self.bias = None if bias is None else bias.detach().float()

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """s_x · Σ_k x8 · w8 for float x2d (M, K) → (M, N) fp32 (the per-channel weight scale not yet applied)."""
        m = x2d.shape[0]
        a = (x2d.float() / self.sx).clamp(-FP8_MAX, FP8_MAX)
        a = F.pad(a, (0, self.w.shape[0] - self.k, 0, (-m) % FP8_PAD)).to(FP8_DTYPE)
        y = torch._scaled_mm(a, self.w, scale_a=self.sx, scale_b=self.one, out_dtype=torch.float32)
        return y[:m, : self.n]

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def raw(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, x.shape[-1])) * self.out_scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, -1).to(out_dtype)

    def nbytes(self) -> int:
        return self.w.numel() + _nbytes(self.bias, self.out_scale)


class Fp8Conv(Fp8Linear):
    """Convolution as unfold (im2col) + the fp8 matmul; groups must be 1. Zero padding commutes with the
    quantization (e4m3 has an exact zero), so the float input is unfolded first and its columns quantized."""

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, bias, x_scale: float, conv: dict) -> None:
        super().__init__(codes, w_scale, bias, x_scale)
        self.conv = conv

    def raw(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        cols, shape = im2col(x.float(), self.conv)
        return col2im(super().raw(cols, torch.float32), shape).to(out_dtype)
