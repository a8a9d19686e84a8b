"""Block reconstruction (BRECQ) for every candidate width, once, shared by every configuration.

AdaRound (reconstruction.py) learns each layer's rounding against that layer's own output. BRECQ learns the rounding
of every layer of a block jointly against the *block's* output (a ResNet block, an attention block, an up/down
sampler), so errors that cancel inside a block are allowed and the ones that reach the next block are not. For
activations it learns the step size of each activation quantizer per candidate width, LSQ-style (straight-through
rounding, the gradient reaching the scale), against the same block output.

What a unit's reconstruction assumes of its neighbours (chosen so that a super-network stays a switch):
- inputs of every block are the FP model's (earlier blocks in full precision), or with `recon_inputs="quantized"`
  the model's with every earlier block (in execution order) at the width being learned — its learned codes, or its
  learned steps — and the target still the FP block output, as BRECQ's and Q-Diffusion's asymmetric reconstruction
  does, so each block also learns to undo the error that reaches it from upstream; or with `recon_inputs="mixed"`
  each input element from either, at even odds redrawn every batch (QDrop's input mixing, which keeps a block from
  fitting its rounding to one upstream error: QDrop's remedy for low bit-widths);
- weights at width b are learned with the block's other weight layers that offer b also at b (jointly), and layers
  that do not offer b in full precision; activations stay unquantized while weights learn;
- activation steps at width a are learned with every quantizer of the block that offers a at a, and weights in full
  precision.
So a unit's codes at b depend only on its block and b, never on the widths chosen elsewhere: any mix the search builds
uses parameters learned under a uniform block, the assumption BRECQ itself makes per block. Layers outside every block
(the stem, the output convolution, the time embedding) are their own block, i.e. plain AdaRound.

Each block's result is kept in a progress directory as soon as the block is done, so a killed calibration continues
with the next block; every (block, width) draws its batches from its own seed, so the resumed result is the
uninterrupted one. The reference runs 20,000 weight and 5,000 activation iterations; the activation iterations here
keep that ratio (a quarter of `recon_iters`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from tmpq.device import module_device
from tmpq.errors import TmpqError
from tmpq.quant.calibration import CalibrationSet
from tmpq.quant.layers import ActQuantizer, MatmulQuant, QuantWeightLayer
from tmpq.quant.primitives import qmax
from tmpq.quant.reconstruction import (
    REG_WEIGHT,
    SoftRounding,
    progress_key,
    read_progress,
    recon_rows,
    regulariser,
    write_progress,
)
from tmpq.sampling.conditioning import call_denoiser

BLOCK_TYPES = (
    "ResnetBlock2D",
    "ResnetBlockCondNorm2D",
    "Attention",
    "FluxAttention",  # diffusers' FLUX attention: its processor's matmuls are called inside it, never as modules
    "BasicTransformerBlock",
    "Downsample2D",
    "Upsample2D",
)
"""Module classes (diffusers' names) whose output is one reconstruction target; the smallest one around a unit."""
ACT_ITERS_SHARE = 0.25
"""Activation-step iterations per (block, width) as a share of `recon_iters` (the reference's 5,000 / 20,000)."""
ACT_LR = 1e-2
"""Adam's step on log(scale): the scale moves by about 1 % per step at first."""


def reconstruction_blocks(sn) -> dict[str, list[str]]:
    """Block path -> the names of the units inside it, in model order. Units outside every block are their own."""
    paths = {id(m): p for p, m in sn.model.named_modules()}
    blocks = [p for p, m in sn.model.named_modules() if type(m).__name__ in BLOCK_TYPES]
    out: dict[str, list[str]] = {}
    for name, unit in sn.units.items():
        path = paths.get(id(unit))
        if path is None:
            raise TmpqError(f"unit {name!r} is not a module of the wrapped model; re-wrap the super-network")
        inside = [b for b in blocks if path.startswith(b + ".")]
        out.setdefault(max(inside, key=len) if inside else path, []).append(name)
    return out


def _seed(block: str, what: str) -> int:
    return zlib.crc32(f"{block}:{what}".encode())


class _BlockData:
    """A block's inputs (positional and keyword) and FP output on the reconstruction rows, batch-first. With `mix`
    (the FP inputs, for recon_inputs="mixed"), a learning batch takes each input element from these inputs or from
    `mix` with even odds, redrawn every batch (QDrop's input mixing); batches drawn without a generator (the final
    error, which decides learned against nearest) read these inputs alone."""

    def __init__(self, args: list, kwargs: dict, out: torch.Tensor, mix: _BlockData | None = None) -> None:
        self.args, self.kwargs, self.out, self.mix = args, kwargs, out, mix
        self.rows = out.shape[0]

    def _rows(self, v, idx: torch.Tensor):
        if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == self.rows:
            return v[idx].contiguous()
        return v

    def batch(self, idx: torch.Tensor, gen: torch.Generator | None = None) -> tuple[list, dict, torch.Tensor]:
        args = [self._rows(a, idx) for a in self.args]
        kwargs = {k: self._rows(v, idx) for k, v in self.kwargs.items()}
        if self.mix is not None and gen is not None:
            fp_args, fp_kwargs, _ = self.mix.batch(idx)
            args = [_mixed(a, f, gen) for a, f in zip(args, fp_args)]
            kwargs = {k: _mixed(v, fp_kwargs[k], gen) for k, v in kwargs.items()}
        return args, kwargs, self.out[idx]


MIX_QUANTIZED_SHARE = 0.5
"""With recon_inputs="mixed", the chance that an input element comes from the quantized model (QDrop's 0.5)."""


def _mixed(quantized, fp, gen: torch.Generator):
    """Each element from `quantized` with probability MIX_QUANTIZED_SHARE, else from `fp` (non-float inputs are
    passed through)."""
    if not (isinstance(quantized, torch.Tensor) and quantized.is_floating_point()):
        return quantized
    keep = torch.rand(quantized.shape, generator=gen).to(quantized.device) < MIX_QUANTIZED_SHARE
    return torch.where(keep, quantized, fp)


def _capture(sn, block: nn.Module, calib: CalibrationSet, idx: torch.Tensor, batch_size: int) -> _BlockData | None:
    """Run the FP model over the rows and keep what `block` receives and returns (None: it is never called)."""
    calls: list[tuple[tuple, dict, torch.Tensor]] = []
    pending: dict = {}

    def pre(module, args, kwargs):
        pending["in"] = (tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()})

    def post(module, args, kwargs, output):
        calls.append((*pending.pop("in"), _output(output).detach().float().clone()))

    h1 = block.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = block.register_forward_hook(post, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, len(idx), batch_size):
                call_denoiser(sn.model, *calib.rows(idx[i : i + batch_size], module_device(sn.model)))
    finally:
        h1.remove()
        h2.remove()
    if not calls:  # its units run inside another module's code, never as a module: they keep their ranges
        return None
    # each call is a valid (input, output) sample of the block, however many there are per model call: with
    # classifier-free guidance a block sees the doubled batch [unconditional; conditional]
    per_call = [c[2].shape[0] for c in calls]

    def join(values: list):
        first = values[0]
        if isinstance(first, torch.Tensor) and first.ndim and all(v.shape[0] == n for v, n in zip(values, per_call)):
            return torch.cat(values)
        return first

    args = [join([c[0][i] for c in calls]) for i in range(len(calls[0][0]))]
    kwargs = {k: join([c[1][k] for c in calls]) for k in calls[0][1]}
    return _BlockData(args, kwargs, torch.cat([c[2] for c in calls]))


def _output(output) -> torch.Tensor:
    """A block's output as one batch-first tensor: a block that returns several (a joint-attention block's image and
    text streams) is judged on all of them, each flattened per row."""
    if not isinstance(output, (tuple, list)):
        return output
    first = output[0]
    parts = [o for o in output if isinstance(o, torch.Tensor) and o.ndim and o.shape[0] == first.shape[0]]
    return parts[0] if len(parts) == 1 else torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


def _detach(v):
    # contiguous copies: a captured input may be a strided view (the attention block's output is one), and the CPU
    # backward of a ResNet block on such an input crashes torch 2.13 when only the time embedding needs a gradient
    return v.detach().clone(memory_format=torch.contiguous_format) if isinstance(v, torch.Tensor) else v


def _squared_error(
    block: nn.Module, data: _BlockData, idx: torch.Tensor, gen: torch.Generator | None = None
) -> torch.Tensor:
    """(block output − FP output)² on the rows `idx`, elementwise (`gen`: a learning batch's draws, see _BlockData)."""
    args, kwargs, ref = data.batch(idx, gen)
    return (_output(block(*args, **kwargs)).float() - ref).pow(2)


def _block_error(block: nn.Module, data: _BlockData, chunk: int = 64) -> float:
    """Mean squared error of the block's output against the FP output over every row."""
    with torch.no_grad():
        total = sum(
            float(_squared_error(block, data, torch.arange(i, min(i + chunk, data.rows))).sum())
            for i in range(0, data.rows, chunk)
        )
    return total / data.out.numel()


def _loss(block: nn.Module, data: _BlockData, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return _squared_error(block, data, idx, gen).mean()


@contextmanager
def _weights(units: dict[str, QuantWeightLayer], weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run the block with these weights in place of the units' own (everything else at full precision)."""
    for name, w in weights.items():
        units[name]._w_active = w.to(units[name].base.weight.dtype)
    try:
        yield
    finally:
        for name in weights:
            units[name]._w_active = None


def learn_block_weights(
    block: nn.Module, units: dict[str, QuantWeightLayer], bits: int, data: _BlockData, iters: int, batch: int, key: str
) -> tuple[dict[str, torch.Tensor], dict]:
    """Learned codes at `bits` of every unit of the block that offers it, against the block output. Returns the codes
    (the nearest rounding's when learning did not lower the block error) and {"nearest", "learned"} errors."""
    soft = {n: SoftRounding(u, bits) for n, u in units.items()}
    gen = torch.Generator().manual_seed(_seed(key, f"w{bits}"))
    opt = torch.optim.Adam([s.v for s in soft.values()], lr=1e-3)
    for i in range(iters):
        idx = torch.randint(0, data.rows, (min(batch, data.rows),), generator=gen)
        hs = {n: s.h() for n, s in soft.items()}
        with _weights(units, {n: soft[n].weight(h) for n, h in hs.items()}):
            loss = _loss(block, data, idx, gen)
        reg = regulariser(hs.values(), i, iters)
        if reg is not None:
            # the layer-wise loss sums over output channels; the block loss is a mean: scale the regulariser alike
            loss = loss + REG_WEIGHT * reg / data.out[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        learned = {n: s.hard_codes().to(torch.uint8) for n, s in soft.items()}
        nearest = {n: s.nearest for n, s in soft.items()}
        errs = {}
        for what, codes in (("nearest", nearest), ("learned", learned)):
            with _weights(units, {n: soft[n].codes_weight(c) for n, c in codes.items()}):
                errs[what] = _block_error(block, data)
    return (learned if errs["learned"] <= errs["nearest"] else nearest), errs


def _ste_fake_quant(scale: torch.Tensor, zp: torch.Tensor, bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def fq(x: torch.Tensor) -> torch.Tensor:
        y = x / scale
        y = y + (y.round() - y).detach()  # straight-through rounding: the gradient reaches the scale (LSQ)
        return (torch.clamp(y + zp, 0, qmax(bits)) - zp) * scale

    return fq


@contextmanager
def _act_steps(quantizers: dict[str, ActQuantizer], bits: int, log_scales: dict[str, torch.Tensor]) -> Iterator[None]:
    """Every quantizer fake-quantizes at `bits` with scale a{bits}_scale · exp(log_scales[name]), differentiably."""
    for name, q in quantizers.items():
        base, zp = getattr(q, f"a{bits}_scale"), getattr(q, f"a{bits}_zp")
        scale = base * log_scales[name].exp()
        q.learning = [_ste_fake_quant(scale[i], zp[i], bits) for i in range(len(base))]
    try:
        yield
    finally:
        for q in quantizers.values():
            q.learning = None


def learn_block_act_steps(
    block: nn.Module, quantizers: dict[str, ActQuantizer], bits: int, data: _BlockData, iters: int, batch: int, key: str
) -> tuple[dict[str, torch.Tensor], dict]:
    """Learned activation scales at `bits` for every quantizer of the block that offers it (weights at full
    precision), against the block output; the calibrated scales where learning did not lower the block error."""
    logs = {n: torch.zeros_like(getattr(q, f"a{bits}_scale")).requires_grad_(True) for n, q in quantizers.items()}
    gen = torch.Generator().manual_seed(_seed(key, f"a{bits}"))
    opt = torch.optim.Adam(list(logs.values()), lr=ACT_LR)
    for _ in range(iters):
        idx = torch.randint(0, data.rows, (min(batch, data.rows),), generator=gen)
        with _act_steps(quantizers, bits, logs):
            loss = _loss(block, data, idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    errs = {}
    zero = {n: torch.zeros_like(v) for n, v in logs.items()}
    with torch.no_grad():
        for what, ls in (("nearest", zero), ("learned", logs)):
            with _act_steps(quantizers, bits, {n: v.detach() for n, v in ls.items()}):
                errs[what] = _block_error(block, data)
        calibrated = {n: getattr(q, f"a{bits}_scale") for n, q in quantizers.items()}
        learned = {n: calibrated[n] * logs[n].detach().exp() for n in quantizers}
    return (learned if errs["learned"] <= errs["nearest"] else calibrated), errs


def _quantizers(sn, names: list[str]) -> dict[str, ActQuantizer]:
    out = {}
    for n in names:
        u = sn.units[n]
        if isinstance(u, QuantWeightLayer):
            out[n] = u.act
        elif isinstance(u, MatmulQuant):
            out[f"{n}.left"], out[f"{n}.right"] = u.left, u.right
    return out


def _file(pdir: Path, block: str) -> Path:
    return pdir / f"{block or 'model'}.safetensors"


def _install(sn, tensors: dict[str, torch.Tensor]) -> None:
    """Learned parameters named `<unit>/<buffer>` (weight codes) or `<quantizer>/<buffer>` (activation scales)."""
    quantizers = _quantizers(sn, list(sn.units))
    for k, v in tensors.items():
        owner, buf = k.rsplit("/", 1)
        target = sn.units[owner] if buf.startswith("w") else quantizers[owner]
        target.register_buffer(buf, v, persistent=False)


def execution_order(sn, calib: CalibrationSet, blocks: list[str]) -> list[str]:
    """The blocks in the order one model call first enters them (blocks it never enters last, in model order): what
    quantized-input reconstruction walks, since a block's input depends only on the blocks run before it."""
    modules = dict(sn.model.named_modules())
    seen: list[str] = []

    def hook(name: str):
        def pre(module, args):
            if name not in seen:
                seen.append(name)

        return pre

    handles = [modules[b].register_forward_pre_hook(hook(b)) for b in blocks]
    try:
        with torch.no_grad():
            call_denoiser(sn.model, *calib.rows(torch.arange(1), module_device(sn.model)))
    finally:
        for h in handles:
            h.remove()
    return seen + [b for b in blocks if b not in seen]


def _upstream_inputs(
    sn,
    block: nn.Module,
    calib: CalibrationSet,
    idx: torch.Tensor,
    batch_size: int,
    fp: _BlockData,
    units: list[str],
    w: int | None = None,
    a: int | None = None,
) -> _BlockData:
    """The block's inputs with `units` (the earlier blocks') weights at `w` or activations at `a` where they offer
    it (everything else in full precision), beside its FP output: asymmetric reconstruction's data (`fp` itself
    when there are no such units); with recon_inputs="mixed", mixed with `fp`'s inputs batch by batch."""
    if not units:
        return fp
    for n in units:
        u = sn.units[n]
        wb = w if isinstance(u, QuantWeightLayer) and w in u.w_candidates else None
        u.set_bits(wb, a if a in u.a_candidates else None)
    try:
        data = _capture(sn, block, calib, idx, batch_size)
    finally:
        sn.set_fp()
    if data is None or data.rows != fp.rows:
        raise TmpqError("a reconstruction block was called differently with quantized inputs; use recon_inputs='fp'")
    return _BlockData(data.args, data.kwargs, fp.out, mix=fp if sn.spec.recon_inputs == "mixed" else None)


def reconstruct_blocks(
    sn, calib: CalibrationSet, progress_dir: str | Path | None = None, batch_size: int = 32, progress: bool = True
) -> dict:
    """BRECQ every block at every candidate weight width, then learn every activation step at every candidate
    activation width, after range calibration. Blocks finished by an earlier, killed call are read from
    `progress_dir` instead of being learned again."""
    spec = sn.spec
    blocks = reconstruction_blocks(sn)
    upstream = spec.recon_inputs != "fp"
    if upstream:
        blocks = {b: blocks[b] for b in execution_order(sn, calib, list(blocks))}
    modules = dict(sn.model.named_modules())
    key = progress_key(sn, calib, method="brecq")
    pdir = Path(progress_dir) if progress_dir is not None else None
    done: dict[str, dict] = {}
    for block in blocks if pdir is not None else ():
        kept = read_progress(_file(pdir, block), key)
        if kept is not None:
            _install(sn, kept[0])
            done[block] = kept[1]
    sn.set_fp()
    idx = recon_rows(len(calib), spec.recon_rows)
    act_iters = max(1, round(spec.recon_iters * ACT_ITERS_SHARE))
    bar = tqdm(total=len(blocks), initial=len(done), desc="brecq", disable=not progress, dynamic_ncols=True)
    skipped: list[str] = []
    for block, names in blocks.items():
        if block in done:
            continue
        module = modules[block]
        data = _capture(sn, module, calib, idx, batch_size)
        if data is None:
            skipped.append(block)
            bar.update(1)
            continue
        weight_units = {n: sn.units[n] for n in names if isinstance(sn.units[n], QuantWeightLayer)}
        quantizers = _quantizers(sn, names)
        learned: dict[str, torch.Tensor] = {}
        errors: dict[str, dict] = {}
        earlier = [n for blk in done for n in blocks[blk]] if upstream else []
        for b in sorted({b for u in weight_units.values() for b in u.w_candidates if u.weight_format(b) == "int"}):
            bar.set_postfix_str(f"{block or 'model'} W{b}", refresh=True)
            units = {n: u for n, u in weight_units.items() if b in u.w_candidates}
            with torch.enable_grad():
                codes, errors[f"w{b}"] = learn_block_weights(
                    module,
                    units,
                    b,
                    _upstream_inputs(sn, module, calib, idx, batch_size, data, earlier, w=b),
                    spec.recon_iters,
                    spec.recon_batch,
                    block,
                )
            learned |= {f"{n}/w{b}_codes": c.contiguous() for n, c in codes.items()}
        for a in sorted({a for q in quantizers.values() for a in q.candidates if not q.is_fp8(a)}):
            bar.set_postfix_str(f"{block or 'model'} A{a}", refresh=True)
            qs = {n: q for n, q in quantizers.items() if a in q.candidates}
            with torch.enable_grad():
                scales, errors[f"a{a}"] = learn_block_act_steps(
                    module,
                    qs,
                    a,
                    _upstream_inputs(sn, module, calib, idx, batch_size, data, earlier, a=a),
                    act_iters,
                    spec.recon_batch,
                    block,
                )
            learned |= {f"{n}/a{a}_scale": s.contiguous() for n, s in scales.items()}
        _install(sn, learned)
        done[block] = errors
        if pdir is not None:
            write_progress(_file(pdir, block), learned, key, errors)
        bar.update(1)
    bar.close()
    gains = [e["nearest"] / max(e["learned"], 1e-30) for d in done.values() for e in d.values()]
    return {
        "method": "brecq",
        "blocks": len(done),
        "units": sum(len(blocks[b]) for b in done),
        "rows": len(idx),
        "iters": spec.recon_iters,
        "act_iters": act_iters,
        "batch": spec.recon_batch,
        "inputs": spec.recon_inputs,
        "median_error_ratio": float(torch.tensor(gains).median()) if gains else 1.0,
        "skipped": skipped,  # units never called as modules (nearest rounding in calibrated ranges)
        "errors": done,
    }
