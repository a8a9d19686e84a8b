"""Range choice: which clipping range each tensor gets, chosen by quantization MSE.

Weights: per output channel, the range [a*min, a*max] with the shrink factor a from a grid that
minimises that channel's MSE (Q-Diffusion / BRECQ do the same search). Activations: per tensor,
the best of shrunk min/max ranges and quantile ranges, scored on a deterministic subsample of the
calibration activations (an unbiased estimate of the full MSE that keeps memory bounded).
"""

from __future__ import annotations

import zlib

import torch

from tmpq.quant.primitives import affine_qparams, fake_quantize

SHRINK_GRID = tuple(1.0 - 0.01 * i for i in range(80))
"""Shrink factors 1.00 .. 0.21: wide enough for 2-bit weights, whose best clip is often near 0.3-0.5."""

QUANTILES = (1e-5, 1e-4, 1e-3, 3e-3, 1e-2)


def weight_qparams(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (scale, zero_point), each of shape (C_out,), minimising per-channel MSE."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    wmin, wmax = w.min(dim=1).values, w.max(dim=1).values
    best_err = torch.full_like(wmin, float("inf"))
    best_scale = torch.ones_like(wmin)
    best_zp = torch.zeros_like(wmin)
    for a in SHRINK_GRID:
        scale, zp = affine_qparams(wmin * a, wmax * a, bits)
        err = (fake_quantize(w, scale[:, None], zp[:, None], bits) - w).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


class ActObserver:
    """Streams activation batches; keeps exact min/max and a bounded, seeded subsample of values."""

    def __init__(self, name: str, max_values: int = 1 << 16, per_batch: int = 4096) -> None:
        self.seed = zlib.crc32(name.encode())
        self.gen = torch.Generator().manual_seed(self.seed)
        self.max_values = max_values
        self.per_batch = per_batch
        self.min = float("inf")
        self.max = float("-inf")
        self.chunks: list[torch.Tensor] = []
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)  # on the activation's device: only the subsample travels to the CPU
        lo, hi = torch.aminmax(flat)
        self.min = min(self.min, float(lo))
        self.max = max(self.max, float(hi))
        self.count += 1
        k = min(self.per_batch, flat.numel())
        idx = torch.randint(flat.numel(), (k,), generator=self.gen)
        self.chunks.append(flat[idx.to(flat.device)].float().cpu())

    def values(self) -> torch.Tensor:
        """The subsample: the same every call (each candidate width is scored on the same values)."""
        vals = torch.cat(self.chunks)
        if vals.numel() > self.max_values:
            keep = torch.randperm(vals.numel(), generator=torch.Generator().manual_seed(self.seed))
            vals = vals[keep[: self.max_values]]
        return vals


def act_qparams(obs: ActObserver, bits: int, method: str = "mse") -> tuple[float, float]:
    """Per-tensor (scale, zero_point) for one candidate bit-width from an observer's statistics."""
    lo, hi = torch.tensor(obs.min), torch.tensor(obs.max)
    if method == "minmax":
        s, z = affine_qparams(lo, hi, bits)
        return float(s), float(z)
    vals = obs.values()
    cands = [(lo * a, hi * a) for a in SHRINK_GRID]
    if vals.numel() > 1:
        qs = torch.quantile(vals, torch.tensor([*QUANTILES, *(1 - q for q in QUANTILES)]))
        cands += [(qs[i], qs[i + len(QUANTILES)]) for i in range(len(QUANTILES))]
    los = torch.stack([c[0] for c in cands])
    his = torch.stack([c[1] for c in cands])
    scale, zp = affine_qparams(los, his, bits)
    err = torch.cat(  # all candidates at once, in chunks that keep the (candidates x values) matrix small
        [
            (fake_quantize(vals, scale[i : i + 16, None], zp[i : i + 16, None], bits) - vals).pow(2).mean(dim=1)
            for i in range(0, len(cands), 16)
        ]
    )
    i = int(torch.argmin(err))  # first minimum: ties resolve the same way every run
    return float(scale[i]), float(zp[i])


__all__ = ["ActObserver", "act_qparams", "weight_qparams"]
