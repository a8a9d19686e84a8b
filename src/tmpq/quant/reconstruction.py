"""Learned rounding (AdaRound) for every candidate weight width, once, shared by every configuration.

Range-only PTQ rounds each weight to its nearest code. AdaRound learns, per weight, whether to round down or up so
that the layer's output on real inputs stays closest to the full-precision output; the result is just other integer
codes, so export, the runtime backends and `to_diffusers` carry it unchanged. As in the paper's precision solver, the
super-network does this once per (unit, weight width) up front, and a switch between widths stays a switch.

What a unit's reconstruction assumes of its neighbours: its inputs are the FP model's (every other layer in full
precision), and its own input activations are left unquantized while it learns. The codes a unit learns at width b
therefore do not depend on any other unit's width, so any mix of widths the search builds is as valid as a uniform
one. (Q-Diffusion reconstructs one uniform setting sequentially on quantized inputs; that ties each unit's codes to
its predecessors' widths, which a super-network mixing widths per unit cannot honour.)

Each unit's learned codes are kept in a progress directory as soon as the unit is done, so a killed calibration
continues with the next unit; every (unit, width) draws its batches from its own seed, so the resumed result is the
uninterrupted one.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tmpq.device import module_device
from tmpq.errors import TmpqError
from tmpq.quant.calibration import CalibrationSet
from tmpq.quant.primitives import channel_view, qmax
from tmpq.sampling.conditioning import call_denoiser

ZETA, GAMMA = 1.1, -0.1
"""The rectified sigmoid's stretch (AdaRound): h(V) reaches exactly 0 and 1, so the rounding can become hard."""
WARMUP = 0.2
"""Share of the iterations with the rounding regulariser off (the soft rounding first fits the output)."""
BETA_START, BETA_END = 20.0, 2.0
REG_WEIGHT = 0.01
CAPTURE_BYTES = 1 << 29
"""Unit inputs held at once: units are reconstructed in chunks whose captured inputs fit in this many bytes."""


def recon_rows(n: int, rows: int) -> torch.Tensor:
    """The calibration rows reconstruction uses: `rows` of them spread evenly over the set (all timesteps)."""
    return torch.linspace(0, n - 1, min(rows, n)).round().long().unique()


class SoftRounding:
    """AdaRound's rectified-sigmoid rounding of one layer's weight at one width, in its calibrated range,
    differentiable in `v` (initialised so that the soft weight starts at the float weight). Layer-wise AdaRound and
    block-wise BRECQ both learn through it."""

    def __init__(self, unit, bits: int) -> None:
        w = unit.base.weight.detach().float()
        self.nearest, scale, zp = unit.weight_codes(bits)
        self.scale, self.zp, self.top = channel_view(scale, w.ndim), channel_view(zp, w.ndim), qmax(bits)
        w_div = w * (1.0 / self.scale)
        self.floor = w_div.floor()
        rest = (w_div - self.floor).clamp(1e-4, 1 - 1e-4)
        self.v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)

    def h(self) -> torch.Tensor:
        """The soft rounding offset in [0, 1] (exactly 0 or 1 at the ends of the stretched sigmoid)."""
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def weight(self, h: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(self.floor + h + self.zp, 0, self.top) - self.zp) * self.scale

    def hard_codes(self) -> torch.Tensor:
        """The learned codes (float): round up where v >= 0."""
        return (self.floor + (self.v >= 0).float() + self.zp).clamp(0, self.top)

    def codes_weight(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes.float() - self.zp) * self.scale


def regulariser(hs, i: int, iters: int) -> torch.Tensor | None:
    """AdaRound's rounding regulariser at iteration `i` (None during the warm-up): pushes every h to 0 or 1, with
    the exponent annealed from BETA_START to BETA_END."""
    warm = int(WARMUP * iters)
    if i < warm:
        return None
    beta = BETA_END + (BETA_START - BETA_END) * (1 - (i - warm) / max(1, iters - warm))
    return sum((1 - (2 * h - 1).abs().pow(beta)).sum() for h in hs)


def _seed(name: str, bits: int) -> int:
    return zlib.crc32(f"{name}:{bits}".encode())


def _output_error(unit, x: torch.Tensor, w_q: torch.Tensor, w_fp: torch.Tensor) -> torch.Tensor:
    """Squared output error summed over output channels, averaged over the rest (BRECQ's reconstruction loss)."""
    d = unit.apply_weight(x, w_q) - unit.apply_weight(x, w_fp)
    channels = d.shape[1] if unit.kind == "conv" else d.shape[-1]
    return d.pow(2).mean() * channels


def adaround_codes(
    unit, bits: int, inputs: torch.Tensor, iters: int, batch_size: int, lr: float = 1e-3
) -> tuple[torch.Tensor, dict]:
    """Learned codes of `unit` at `bits` on its captured FP `inputs`, with the unit's calibrated scale and zero
    point. Returns the codes and {"nearest": error, "learned": error} on the inputs (the codes are the nearest
    rounding's when learning did not lower the error: reconstruction is never worse than range-only)."""
    soft = SoftRounding(unit, bits)
    w = unit.base.weight.detach().float()
    gen = torch.Generator().manual_seed(_seed(unit.name, bits))
    opt = torch.optim.Adam([soft.v], lr=lr)
    for i in range(iters):
        idx = torch.randint(0, inputs.shape[0], (min(batch_size, inputs.shape[0]),), generator=gen)
        h = soft.h()
        loss = _output_error(unit, inputs[idx].to(w.device), soft.weight(h), w)
        reg = regulariser([h], i, iters)
        if reg is not None:
            loss = loss + REG_WEIGHT * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        learned = soft.hard_codes()
        nearest = soft.nearest.float()
        errs = {}
        for key, codes in (("nearest", nearest), ("learned", learned)):
            wq = soft.codes_weight(codes)
            errs[key] = float(
                sum(_output_error(unit, inputs[i : i + 64].to(w.device), wq, w) for i in range(0, len(inputs), 64))
            )
    best = learned if errs["learned"] <= errs["nearest"] else nearest
    return best.to(torch.uint8), errs


class _Capture:
    """Forward pre-hooks that copy each unit's input rows into one preallocated tensor per unit."""

    def __init__(self, units: dict, rows: int) -> None:
        self.units, self.rows = units, rows
        self.store: dict[str, torch.Tensor] = {}
        self.pos: dict[str, int] = {}
        self.hooks = [u.register_forward_pre_hook(self._hook(n)) for n, u in units.items()]

    def _hook(self, name: str):
        def pre(module, args):
            x = args[0].detach()
            if name not in self.store:
                self.store[name] = torch.empty((self.rows, *x.shape[1:]), dtype=torch.float32)
                self.pos[name] = 0
            p = self.pos[name]
            self.store[name][p : p + x.shape[0]] = x.float().cpu()
            self.pos[name] = p + x.shape[0]

        return pre

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _input_bytes(sn, units: dict, calib: CalibrationSet) -> dict[str, int]:
    """Bytes of one calibration row's input to each unit (one probe forward)."""
    cap = _Capture(units, 1)
    try:
        call_denoiser(sn.model, *calib.rows(slice(0, 1), module_device(sn.model)))
    finally:
        cap.close()
    return {n: t[0].numel() * 4 for n, t in cap.store.items()}


def _chunks(names: Sequence[str], per_row: dict[str, int], rows: int) -> list[list[str]]:
    out, cur, size = [], [], 0
    for n in names:
        need = per_row.get(n, 0) * rows
        if cur and size + need > CAPTURE_BYTES:
            out.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += need
    return out + [cur] if cur else out


def progress_key(sn, calib: CalibrationSet, **extra) -> str:
    """What a progress file was learned under: the weights, the spec and the calibration set (and `extra`)."""
    return json.dumps(
        {"fingerprint": sn.fingerprint, "spec": sn.spec.to_dict(), "calib": calib.config.__dict__, **extra}
    )


def read_progress(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, errors) of a finished unit or block learned under `key`; None when missing, stale or damaged (then
    it is learned again)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("key") != key:
                return None
            return {k: fh.get_tensor(k) for k in fh.keys()}, json.loads(meta["errors"])  # noqa: SIM118 (not a dict)
    except Exception:  # safetensors raises several types for a damaged file
        return None


def write_progress(path: Path, tensors: dict[str, torch.Tensor], key: str, errors: dict) -> None:
    """Keep a finished unit or block, atomically (a kill mid-write leaves no half file to be read back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"key": key, "errors": json.dumps(errors)}
    )
    tmp.replace(path)


@torch.no_grad()
def reconstruct_weights(
    sn, calib: CalibrationSet, progress_dir: str | Path | None = None, batch_size: int = 32, progress: bool = True
) -> dict:
    """AdaRound every weight unit at every candidate width of `sn.spec`, after range calibration. Units finished
    by an earlier, killed call are read from `progress_dir` instead of being learned again."""
    spec = sn.spec
    units = {n: u for n, u in sn.units.items() if hasattr(u, "calibrate_weights") and u.w_candidates}
    key = progress_key(sn, calib)
    pdir = Path(progress_dir) if progress_dir is not None else None
    done: dict[str, dict] = {}
    for name in units if pdir is not None else ():
        kept = read_progress(pdir / f"{name}.safetensors", key)
        if kept is not None:
            for k, v in kept[0].items():
                units[name].register_buffer(k, v, persistent=False)
            done[name] = kept[1]
    todo = [n for n in units if n not in done]
    sn.set_fp()
    idx = recon_rows(len(calib), spec.recon_rows)
    bar = tqdm(total=len(units), initial=len(done), desc="adaround", disable=not progress, dynamic_ncols=True)
    if todo:
        per_row = _input_bytes(sn, {n: units[n] for n in todo}, calib)
        for chunk in _chunks(todo, per_row, len(idx)):
            cap = _Capture({n: units[n] for n in chunk}, len(idx))
            try:
                for i in range(0, len(idx), batch_size):
                    call_denoiser(sn.model, *calib.rows(idx[i : i + batch_size], module_device(sn.model)))
            finally:
                cap.close()
            for name in chunk:
                unit, inputs = units[name], cap.store.pop(name)
                errors: dict[str, dict] = {}
                codes: dict[int, torch.Tensor] = {}
                for b in unit.w_candidates:
                    if unit.weight_format(b) != "int":  # fp8 has no integer rounding to learn
                        continue
                    bar.set_postfix_str(f"{name} W{b}", refresh=True)
                    with torch.enable_grad():
                        codes[b], errors[str(b)] = adaround_codes(unit, b, inputs, spec.recon_iters, spec.recon_batch)
                for b, c in codes.items():
                    unit.register_buffer(f"w{b}_codes", c, persistent=False)
                done[name] = errors
                if pdir is not None:
                    tensors = {f"w{b}_codes": c for b, c in codes.items()}
                    write_progress(pdir / f"{name}.safetensors", tensors, key, errors)
                bar.update(1)
    bar.close()
    if not units:
        raise TmpqError("reconstruction found no weight layers with candidate widths to learn rounding for")
    gains = [e[b]["nearest"] / max(e[b]["learned"], 1e-30) for e in done.values() for b in e]
    return {
        "method": spec.reconstruction,
        "units": len(done),
        "rows": len(idx),
        "iters": spec.recon_iters,
        "batch": spec.recon_batch,
        "median_error_ratio": float(torch.tensor(gains).median()) if gains else 1.0,
        "errors": done,
    }
