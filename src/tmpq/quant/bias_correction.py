"""Bias-corrected rounding: weight codes whose rounding errors cancel on the layer's mean input, where that pays.

Rounding each weight to its nearest code leaves, per output channel, an error Σ_k Δw_k · E[a_k] in the layer's mean
output (Nagel et al., 2019, "Data-Free Quantization": the quantization *bias*). It does not average out over inputs:
it is one fixed offset per channel. On the built-in model the last convolution (one output channel, pinned at 8 bits)
shifts ε̂ by +0.007 at every timestep this way, which moves FID at 10 steps more than all other 8-bit errors together.

The classic fix subtracts the offset from the layer's bias. Here the rounding is changed instead, so the result is
only other integer codes (export, reload and every runtime backend carry it unchanged, as learned rounding): per
output channel, weights are moved to their other neighbouring code while that lowers the channel's expected squared
output error, E[(Δw·a)²] ≈ (Δw·E[a])² + Σ_k Δw_k² Var(a_k) (the offset, and the per-weight error weighted by its
input's variance). At 8 bits a flip costs little and the offset goes; at 4 bits each flip costs as much as it
removes, and few are made — cancelling the offset at any price (the first version of this module) raised the
built-in model's W4A8 ε̂ error at t = 200 by 40 %. E[a] and E[a²] are measured on the calibration set with the FP model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tmpq.quant.primitives import qmax


def input_mean_shape_ok(base: nn.Module) -> bool:
    """Whether `sum_input` can describe what `base`'s weight multiplies: Linear, or a zero-padded ungrouped Conv2d
    with integer padding (diffusers' UNets and transformers use only these)."""
    if isinstance(base, nn.Linear):
        return True
    return (
        isinstance(base, nn.Conv2d)
        and base.groups == 1
        and base.padding_mode == "zeros"
        and not isinstance(base.padding, str)
    )


def sum_input(base: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(Σ and Σ of squares, over every output position, of the input each weight multiplies, flattened as
    `weight.reshape(out, -1)`; the number of positions). For a convolution: per (input channel, kernel row, kernel
    column), over the strided window of that kernel tap in the zero-padded input, without unfolding the input."""
    x = x.detach().float()
    if isinstance(base, nn.Linear):
        flat = x.reshape(-1, x.shape[-1])
        return flat.sum(0), flat.pow(2).sum(0), flat.shape[0]
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = base.kernel_size, base.stride, base.dilation, base.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    total = torch.empty(x.shape[1], kh, kw, device=x.device)
    squares = torch.empty_like(total)
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
            total[:, i, j] = tap.sum((0, 2, 3))
            squares[:, i, j] = tap.pow(2).sum((0, 2, 3))
    return total.reshape(-1), squares.reshape(-1), x.shape[0] * ho * wo


def balance_codes(
    weight: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor,
    bits: int,
    mean: torch.Tensor,
    second: torch.Tensor,
) -> torch.Tensor:
    """`codes` (per-output-channel affine, `weight.reshape(out, -1)` order) with the one-step flips that most lower
    each channel's expected squared output error (Δw·m)² + Σ_k Δw_k² v_k, for input means m = `mean` and variances
    v = `second` − m² (`second`: E[a²]).

    A flip moves a weight to its other neighbouring code: the offset Δw·m changes by δ_k = ±s·m_k and Δw_k² grows by
    s·(s − 2|e_k|) (e_k its current error). Per channel the flips that shrink the offset are ordered by the variance
    error they add per unit of offset they remove, and the prefix with the smallest total error is kept (none when
    no flip pays). Vectorised over channels; the total never rises above the nearest rounding's."""
    shape = codes.shape
    w = weight.detach().float().reshape(shape[0], -1)
    q = codes.reshape(shape[0], -1).float()
    s, z = scale.float()[:, None], zp.float()[:, None]
    m = mean.float().to(w.device)[None, :]
    var = (second.float().to(w.device)[None, :] - m * m).clamp_min(0)
    err = (q - z) * s - w
    offset = (err * m).sum(1, keepdim=True)
    step = torch.where(err > 0, -1.0, 1.0)  # towards the other neighbour of w
    flipped = q + step
    delta = step * s * m  # change of the offset if this weight flips
    helps = (flipped >= 0) & (flipped <= qmax(bits)) & (delta * offset < 0)
    cost = var * (s * (s - 2 * err.abs())).clamp_min(0)  # added variance error
    ratio = torch.where(helps, cost / delta.abs().clamp_min(1e-30), torch.inf)
    order = ratio.argsort(1)
    moved = torch.gather(torch.where(helps, delta, 0.0), 1, order).cumsum(1)
    added = torch.gather(torch.where(helps, cost, 0.0), 1, order).cumsum(1)
    total = torch.cat([offset.pow(2), (offset + moved).pow(2) + added], 1)
    take = total.argmin(1, keepdim=True)  # how many of the ordered flips to make (0: none pays)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    q = torch.where(helps & (rank < take), flipped, q)
    return q.to(codes.dtype).reshape(shape)


__all__ = ["balance_codes", "input_mean_shape_ok", "sum_input"]
