"""Quantized twins of Conv2d, Linear and the attention matmuls, holding parameters for every candidate.

Each twin wraps the original module (no weight copy) and stores, per candidate bit-width, the integer
weight codes (uint8) with per-channel scale and zero point, and per candidate activation width a
per-tensor scale and zero point. `set_bits(w, a)` switches between candidates, or to full precision
with None, by dequantizing one weight tensor: no recalibration, no model copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tmpq.errors import TmpqError
from tmpq.quant.observers import ActObserver, act_qparams, weight_qparams
from tmpq.quant.primitives import (
    channel_view,
    dequantize,
    fake_quantize_,
    fake_quantize_fused,
    fp8_dequantize,
    fp8_fake_quantize,
    fp8_quantize,
    fp8_scale,
    fused_qparams,
    quantize,
    width_format,
)


def _check_bits(bits: int | None, candidates: Sequence[int], what: str, name: str) -> None:
    if bits is not None and bits not in candidates:
        raise TmpqError(
            f"{what} bit-width {bits} is not a calibrated candidate of layer {name!r} (candidates: "
            f"{sorted(candidates) or 'none'}); pick one of them or re-calibrate with it in the QuantSpec"
        )


class ActQuantizer(nn.Module):
    """Per-tensor affine fake quantizer; `split` quantizes channels [:split] and [split:] separately.

    The split is Q-Diffusion's remedy for skip-connection concatenations, whose two halves have very
    different ranges: one shared range would waste most codes on one of them. With `fp8`, the 8-bit candidate is
    float8 e4m3 with a per-tensor scale (amax / 448) instead of integer codes.
    """

    def __init__(self, name: str, candidates: Sequence[int], split: int | None = None, fp8: bool = False) -> None:
        super().__init__()
        self.name = name
        self.candidates = tuple(sorted(candidates))
        self.split = split
        self.fp8 = fp8
        self.bits: int | None = None
        self.observers: list[ActObserver] | None = None
        # set only while block reconstruction learns the step size (brecq.py): one differentiable fake
        # quantizer per part, used in place of the stored scale
        self.learning: list | None = None
        self._fused_cache: tuple | None = None  # (scale, zp, (channels, device), range): see _fused_qparams

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.split is None:
            return [x]
        return list(x.split([self.split, x.shape[1] - self.split], dim=1))

    def set_bits(self, bits: int | None) -> None:
        _check_bits(bits, self.candidates, "activation", self.name)
        if bits is not None and not hasattr(self, f"a{bits}_scale"):
            raise TmpqError(f"layer {self.name!r} is not calibrated yet; run SuperNet.calibrate first")
        self.bits = bits

    def start_observing(self, max_values: int) -> None:
        n = 1 if self.split is None else 2
        self.observers = [ActObserver(f"{self.name}#{i}", max_values=max_values) for i in range(n)]

    def finish_observing(self, method: str) -> None:
        if not self.observers or self.observers[0].count == 0:
            raise TmpqError(f"layer {self.name!r} saw no calibration data; is it used by the model's forward?")
        for b in self.candidates:
            if self.is_fp8(b):  # e4m3 keeps relative precision: the whole range, no clipping search
                amax = [max(abs(o.min), abs(o.max)) for o in self.observers]
                qp = [(float(fp8_scale(torch.tensor(m))), 0.0) for m in amax]
            else:
                qp = [act_qparams(o, b, method) for o in self.observers]
            self.register_buffer(f"a{b}_scale", torch.tensor([s for s, _ in qp]), persistent=False)
            self.register_buffer(f"a{b}_zp", torch.tensor([z for _, z in qp]), persistent=False)
        self.observers = None

    def is_fp8(self, bits: int | None) -> bool:
        """Whether activations at `bits` are float8 e4m3 (the 8-bit candidate of an fp8 super-network)."""
        return width_format(bits, self.fp8) != "int"

    def _fused_qparams(self, scale: torch.Tensor, zp: torch.Tensor, x: torch.Tensor) -> tuple:
        """The fused kernel's range, made once per switch (read from the device once, per-channel tensors built once:
        no host sync and no copy in the sampling loop)."""
        where = (x.shape[1], x.device)
        cached = self._fused_cache
        if cached is None or cached[0] is not scale or cached[1] is not zp or cached[2] != where:
            qp = fused_qparams(scale.tolist(), [int(z) for z in zp.tolist()], self.split, *where)
            cached = self._fused_cache = (scale, zp, where, qp)
        return cached[3]

    def qparams(self) -> dict[str, torch.Tensor]:
        out = {}
        for b in self.candidates:
            out[f"a{b}_scale"] = getattr(self, f"a{b}_scale")
            out[f"a{b}_zp"] = getattr(self, f"a{b}_zp")
        return out

    def load_qparams(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.register_buffer(k, v.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observers is not None:
            for obs, part in zip(self.observers, self.parts(x)):
                obs.update(part)
        if self.learning is not None:
            parts = [fq(p) for fq, p in zip(self.learning, self.parts(x))]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if self.bits is None:
            return x
        scale, zp = getattr(self, f"a{self.bits}_scale"), getattr(self, f"a{self.bits}_zp")
        if self.is_fp8(self.bits):
            parts = [fp8_fake_quantize(p, scale[i]) for i, p in enumerate(self.parts(x))]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if x.device.type != "cpu":  # one fused kernel per quantizer (launch-bound devices)
            return fake_quantize_fused(x, self._fused_qparams(scale, zp, x), self.bits)
        out = x.clone()
        for i, part in enumerate(self.parts(out)):  # views of the copy: no split/cat round trip
            fake_quantize_(part, scale[i], zp[i], self.bits)
        return out


class QuantUnit(nn.Module):
    """A searchable unit: one weight gene (None for matmuls) and one activation gene."""

    kind: str = ""
    w_candidates: tuple[int, ...] = ()
    a_candidates: tuple[int, ...] = ()

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.counting = False
        self.macs = 0

    @property
    def bits(self) -> tuple[int | None, int | None]:
        raise NotImplementedError

    def set_bits(self, w: int | None, a: int | None) -> None:
        raise NotImplementedError


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, fmt: str = "int") -> torch.Tensor:
    """A weight from its per-output-channel codes in either format (`QuantWeightLayer.weight_format`)."""
    nd = codes.ndim
    if fmt == "fp8_e4m3":
        return fp8_dequantize(codes, channel_view(scale.float(), nd))
    return dequantize(codes, channel_view(scale, nd), channel_view(zp, nd))


class WeightCodes(NamedTuple):
    """A weight's integer codes at one width with their per-output-channel scale and zero point:
    w ≈ (codes − zp) · scale; for an e4m3 width (`QuantWeightLayer.weight_format`) the codes are float8 bit patterns,
    zp is 0 and w ≈ e4m3(codes) · scale (`dequantize_weight` reads both). What runtime backends and export read."""

    codes: torch.Tensor
    scale: torch.Tensor
    zp: torch.Tensor


class QuantWeightLayer(QuantUnit):
    """A Conv2d/Linear twin: per-width weight codes (calibrated once) and an activation quantizer."""

    def __init__(
        self,
        base: nn.Module,
        name: str,
        w_candidates: Sequence[int],
        a_candidates: Sequence[int],
        fp8: bool = False,
    ) -> None:
        super().__init__(name)
        self.base = base
        self.w_candidates = tuple(sorted(w_candidates))
        self.a_candidates = tuple(sorted(a_candidates))
        self.fp8 = fp8  # the 8-bit weight (and activation) candidate is float8 e4m3
        self.act = ActQuantizer(name, self.a_candidates, fp8=fp8)
        self.w_bits: int | None = None
        self._w_active: torch.Tensor | None = None

    @property
    def bits(self) -> tuple[int | None, int | None]:
        return self.w_bits, self.act.bits

    @property
    def weight_params(self) -> int:
        return self.base.weight.numel()

    @property
    def bias_params(self) -> int:
        return 0 if self.base.bias is None else self.base.bias.numel()

    def calibrate_weights(self) -> None:
        w = self.base.weight.detach()
        for b in self.w_candidates:
            if self.weight_format(b) == "fp8_e4m3":  # e4m3 bit patterns, per-channel amax scale, no zero point
                scale = fp8_scale(w.float().reshape(w.shape[0], -1).abs().amax(1))
                zp = torch.zeros_like(scale)
                codes = fp8_quantize(w, channel_view(scale, w.ndim))
            else:
                scale, zp = weight_qparams(w, b)
                codes = quantize(w.float(), channel_view(scale, w.ndim), channel_view(zp, w.ndim), b)
            self.register_buffer(f"w{b}_codes", codes, persistent=False)
            self.register_buffer(f"w{b}_scale", scale, persistent=False)
            self.register_buffer(f"w{b}_zp", zp, persistent=False)

    def qparams(self) -> dict[str, torch.Tensor]:
        out = {k: getattr(self, k) for b in self.w_candidates for k in (f"w{b}_codes", f"w{b}_scale", f"w{b}_zp")}
        out.update({f"act.{k}": v for k, v in self.act.qparams().items()})
        return out

    def load_qparams(self, tensors: dict[str, torch.Tensor]) -> None:
        act = {k[4:]: v for k, v in tensors.items() if k.startswith("act.")}
        for k, v in tensors.items():
            if not k.startswith("act."):
                self.register_buffer(k, v.clone(), persistent=False)
        self.act.load_qparams(act)

    def weight_codes(self, bits: int) -> WeightCodes:
        """The public read of this layer's weight at `bits` (the codes a runtime kernel or an export uses)."""
        if bits not in self.w_candidates or not hasattr(self, f"w{bits}_codes"):
            raise TmpqError(
                f"layer {self.name!r} has no calibrated {bits}-bit weights (widths {list(self.w_candidates)}); "
                "calibrate the super-network with that width"
            )
        return WeightCodes(*(getattr(self, f"w{bits}_{k}") for k in ("codes", "scale", "zp")))

    def weight_format(self, bits: int) -> str:
        """'fp8_e4m3' when this width's codes are e4m3 bit patterns, 'int' for affine integer codes."""
        return width_format(bits, self.fp8)

    def dequantized_weight(self, bits: int) -> torch.Tensor:
        w = self.base.weight
        codes, scale, zp = (t.to(w.device) for t in self.weight_codes(bits))
        return dequantize_weight(codes, scale, zp, self.weight_format(bits)).to(w.dtype)

    def set_bits(self, w: int | None, a: int | None) -> None:
        _check_bits(w, self.w_candidates, "weight", self.name)
        if w is not None and not hasattr(self, f"w{w}_codes"):
            raise TmpqError(f"layer {self.name!r} is not calibrated yet; run SuperNet.calibrate first")
        self.act.set_bits(a)
        self.w_bits = w
        self._w_active = None if w is None else self.dequantized_weight(w)

    def weight(self) -> torch.Tensor:
        return self.base.weight if self._w_active is None else self._w_active


class QuantConv2d(QuantWeightLayer):
    kind = "conv"

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's operation with `weight` in place of its own (what reconstruction optimises through)."""
        return self.base._conv_forward(x, weight, self.base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.apply_weight(self.act(x), self.weight())
        if self.counting:
            k = self.base.weight[0].numel()  # (C_in / groups) * kh * kw MACs per output element
            self.macs += y.numel() * k  # the whole call: tracing runs one image (both halves of a guided batch)
        return y


class QuantLinear(QuantWeightLayer):
    kind = "linear"

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.apply_weight(self.act(x), self.weight())
        if self.counting:
            self.macs += y.numel() * self.base.in_features  # tokens × out × in, over the whole call
        return y


class MatmulQuant(QuantUnit):
    """Both operands of an activation-activation matmul (q·kᵀ or softmax·v), at one activation width."""

    kind = "matmul"

    def __init__(self, name: str, a_candidates: Sequence[int], fp8: bool = False) -> None:
        super().__init__(name)
        self.a_candidates = tuple(sorted(a_candidates))
        self.fp8 = fp8
        self.left = ActQuantizer(f"{name}.left", self.a_candidates, fp8=fp8)
        self.right = ActQuantizer(f"{name}.right", self.a_candidates, fp8=fp8)
        self.weight_params = 0
        self.bias_params = 0

    @property
    def bits(self) -> tuple[int | None, int | None]:
        return None, self.left.bits

    def set_bits(self, w: int | None, a: int | None) -> None:
        if w is not None:
            raise TmpqError(f"{self.name!r} is an activation-activation matmul; it has no weight bits (use None)")
        self.left.set_bits(a)
        self.right.set_bits(a)

    def qparams(self) -> dict[str, torch.Tensor]:
        out = {f"left.{k}": v for k, v in self.left.qparams().items()}
        out.update({f"right.{k}": v for k, v in self.right.qparams().items()})
        return out

    def load_qparams(self, tensors: dict[str, torch.Tensor]) -> None:
        self.left.load_qparams({k[5:]: v for k, v in tensors.items() if k.startswith("left.")})
        self.right.load_qparams({k[6:]: v for k, v in tensors.items() if k.startswith("right.")})

    def operands(self, a: torch.Tensor, b: torch.Tensor, transpose_b: bool) -> tuple:
        if self.counting:
            n, inner = a.shape[-2], a.shape[-1]
            m = b.shape[-2] if transpose_b else b.shape[-1]
            self.macs += a[..., 0, 0].numel() * n * inner * m  # every (batch × head) product of the call
        return self.left(a), self.right(b)


class _QuantAttention(nn.Module):
    """What every quantized attention processor holds: the q·kᵀ and softmax·v matmuls as units of their own."""

    def __init__(self, name: str, a_candidates: Sequence[int], fp8: bool = False) -> None:
        super().__init__()
        self.qk = MatmulQuant(f"{name}.qk", a_candidates, fp8)
        self.av = MatmulQuant(f"{name}.av", a_candidates, fp8)


class QuantAttnProcessor(_QuantAttention):
    """diffusers' classic AttnProcessor with the q·kᵀ and softmax·v operands fake-quantized.

    The projections (to_q, to_k, to_v, to_out) are ordinary Linear layers and get their own twins.
    """

    def __call__(  # __call__ itself, with diffusers' signature: Attention inspects it to decide which kwargs to pass
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        query, key = self.qk.operands(query, key, transpose_b=True)
        probs = attn.get_attention_scores(query, key, attention_mask)
        probs, value = self.av.operands(probs, value, transpose_b=False)
        hidden_states = torch.bmm(probs, value)

        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class QuantJointAttnProcessor(_QuantAttention):
    """diffusers' `JointAttnProcessor2_0` (Stable Diffusion 3's joint attention over [image; context] tokens) with
    the q·kᵀ and softmax·v operands fake-quantized, as `QuantAttnProcessor` does for self/cross attention. The
    image and context projections (to_q/k/v, add_q/k/v_proj, to_out, to_add_out) are Linear twins of their own."""

    def _heads(self, attn: nn.Module, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        b, n, inner = x.shape
        x = x.view(b, n, attn.heads, inner // attn.heads).transpose(1, 2)
        return x if norm is None else norm(x)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        n_img = hidden_states.shape[1]
        query = self._heads(attn, attn.to_q(hidden_states), attn.norm_q)
        key = self._heads(attn, attn.to_k(hidden_states), attn.norm_k)
        value = self._heads(attn, attn.to_v(hidden_states), None)
        if encoder_hidden_states is not None:
            ctx = encoder_hidden_states
            query = torch.cat([query, self._heads(attn, attn.add_q_proj(ctx), attn.norm_added_q)], dim=2)
            key = torch.cat([key, self._heads(attn, attn.add_k_proj(ctx), attn.norm_added_k)], dim=2)
            value = torch.cat([value, self._heads(attn, attn.add_v_proj(ctx), None)], dim=2)
        b, h, n, d = query.shape
        q, k, v = (x.reshape(b * h, n, d) for x in (query, key, value))
        q, k = self.qk.operands(q, k, transpose_b=True)
        probs = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * (d**-0.5), dim=-1)
        probs, v = self.av.operands(probs, v, transpose_b=False)
        out = torch.bmm(probs, v).reshape(b, h, n, d).transpose(1, 2).reshape(b, n, h * d).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, ctx_out = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx_out = attn.to_add_out(ctx_out)
        return attn.to_out[1](attn.to_out[0](out)), ctx_out


class QuantFluxAttnProcessor(_QuantAttention):
    """diffusers' `FluxAttnProcessor` (FLUX's attention over [context; image] tokens in the double-stream blocks, over
    the joined tokens in the single-stream ones, rotary position embeddings on q and k) with the q·kᵀ and softmax·v
    operands fake-quantized. Projections (to_q/k/v, add_q/k/v_proj, to_out, to_add_out) are Linear twins."""

    @staticmethod
    def _heads(attn: nn.Module, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        x = x.unflatten(-1, (-1, attn.head_dim))  # (batch, tokens, heads, head_dim)
        return x if norm is None else norm(x)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        query = self._heads(attn, attn.to_q(hidden_states), attn.norm_q)
        key = self._heads(attn, attn.to_k(hidden_states), attn.norm_k)
        value = self._heads(attn, attn.to_v(hidden_states), None)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            ctx = encoder_hidden_states
            query = torch.cat([self._heads(attn, attn.add_q_proj(ctx), attn.norm_added_q), query], dim=1)
            key = torch.cat([self._heads(attn, attn.add_k_proj(ctx), attn.norm_added_k), key], dim=1)
            value = torch.cat([self._heads(attn, attn.add_v_proj(ctx), None), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (batch, heads, tokens, head_dim)
        q, k = self.qk.operands(q, k, transpose_b=True)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if attention_mask is not None:  # as scaled_dot_product_attention reads a mask: boolean keep, or additive
            scores = (
                scores.masked_fill(~attention_mask, float("-inf"))
                if attention_mask.dtype == torch.bool
                else (scores + attention_mask)
            )
        probs, v = self.av.operands(torch.softmax(scores, dim=-1), v, transpose_b=False)
        out = torch.matmul(probs, v).transpose(1, 2).flatten(2, 3).to(query.dtype)
        if not joint:
            return out
        n_ctx = encoder_hidden_states.shape[1]
        ctx_out, out = out[:, :n_ctx], out[:, n_ctx:]
        return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(ctx_out)


ATTENTION_PROCESSORS: dict[str, type[nn.Module]] = {
    "AttnProcessor": QuantAttnProcessor,
    "AttnProcessor2_0": QuantAttnProcessor,
    "JointAttnProcessor2_0": QuantJointAttnProcessor,
    "FluxAttnProcessor": QuantFluxAttnProcessor,
}
"""diffusers attention processors by class name → the quantized processor that stands in for them; attention
modules with any other processor keep their matmuls in full precision."""

QUANT_LAYERS: dict[type[nn.Module], type[QuantWeightLayer]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
"""Registry from module type to its quantized twin (exact type match: subclasses may change forward)."""
