"""How much of a quantized sampler's FID comes from a constant offset of ε̂: the measurement behind bias correction.

Two parts, on the built-in model:
- `--probe`: per timestep of the calibration set, the mean of ε̂(quantized) − ε̂(FP) and the relative error, for
  uniform WxAy configs of a super-network calibrated with and without bias-corrected rounding.
- otherwise: FID of the FP model and of uniform configs at `--steps` uniform steps, with a constant `--offsets`
  added to ε̂ (0 = as is). If adding the offset to FP reproduces a quantized row's FID, and subtracting it from the
  quantized row takes it back to FP's, the offset is what the quantized row's FID gain was.

    .venv/bin/python bench/eps_offset.py --probe --out runs/eps_offset
    .venv/bin/python bench/eps_offset.py --num-samples 1000 --configs FP,W8A8,W6A6 --offsets 0,0.007,-0.0069 \\
        --no-bias-correction --out runs/eps_offset
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import torch
import typer
from torch import nn

from tmpq.evaluate import EvalConfig, evaluate, reference_metric
from tmpq.models.loading import load_model
from tmpq.quant import CalibConfig, QuantSpec
from tmpq.quant.prepare import prepare_supernet
from tmpq.search.config import precision_of


class Offset(nn.Module):
    """The denoiser with a constant added to its ε̂."""

    def __init__(self, inner: nn.Module, offset: float) -> None:
        super().__init__()
        self.inner, self.offset = inner, offset

    def forward(self, x, t, *args, **kwargs):
        return self.inner(x, t, *args, **kwargs) + self.offset


def _supernet(loaded, out: Path, bias_correction: bool):
    spec = QuantSpec(bias_correction=bias_correction, reconstruction=None)
    run = out / ("corrected" if bias_correction else "nearest")
    sn, calib, _ = prepare_supernet(loaded, run, CalibConfig(num_samples=128, num_steps=20), spec, progress=False)
    return sn, calib


@torch.no_grad()
def probe(out: Path, configs: list[tuple[int, int]]) -> None:
    typer.echo("| rounding | config | t | mean ε̂ offset | relative error |\n|---|---|---:|---:|---:|")
    for corrected in (False, True):
        loaded = load_model("builtin:fashion")
        sn, calib = _supernet(loaded, out, corrected)
        steps = sorted(set(calib.t.tolist()), reverse=True)[::3]
        for w, a in configs:
            for tv in steps:
                idx = (calib.t == tv).nonzero().flatten()[:64]
                x, t, _ = calib.rows(idx)
                sn.set_fp()
                fp = sn(x, t)
                sn.set_config(sn.uniform_config(w, a))
                q = sn(x, t)
                rel = float((q - fp).norm() / fp.norm())
                name = "bias-corrected" if corrected else "nearest"
                typer.echo(f"| {name} | W{w}A{a} | {tv} | {float((q - fp).mean()):+.4f} | {rel:.4f} |")


def main(
    probe_only: Annotated[bool, typer.Option("--probe", help="print the per-timestep offsets and stop")] = False,
    configs: str = "FP,W8A8,W6A6",
    offsets: str = "0,0.007,-0.0069",
    steps: int = 10,
    num_samples: int = 1000,
    bias_correction: Annotated[bool, typer.Option("--bias-correction/--no-bias-correction")] = True,
    out: Path = Path("runs/eps_offset"),
    threads: int = 1,
) -> None:
    torch.set_num_threads(threads)
    wa = [precision_of(c) for c in configs.upper().split(",") if c != "FP"]
    if probe_only:
        return probe(out, wa)
    loaded = load_model("builtin:fashion")
    sn, _ = _supernet(loaded, out, bias_correction)
    metric = reference_metric("fashion-mnist")
    rows = []
    for label in configs.upper().split(","):
        if label == "FP":
            sn.set_fp()
        else:
            sn.set_config(sn.uniform_config(*precision_of(label)))
        for c in (float(v) for v in offsets.split(",")):
            cfg = EvalConfig(model="builtin:fashion", steps=steps, schedule="uniform", num_samples=num_samples)
            with torch.no_grad():
                r = evaluate(cfg, None, loaded=replace(loaded, denoiser=Offset(sn, c)), metric=metric, progress=False)
            rows.append({"config": label, "offset": c, "fid": r.fid, "bias_correction": bias_correction})
            typer.echo(f"{label} offset {c:+.4f}: FID {r.fid:.2f} ({num_samples} samples)", err=True)
    (out / "fid.json").write_text(json.dumps(rows, indent=1))
    typer.echo("| sampler | ε̂ offset added | FID |\n|---|---:|---:|")
    for r in rows:
        typer.echo(f"| {r['config']} | {r['offset']:+.4f} | {r['fid']:.2f} |")


if __name__ == "__main__":
    from tmpq.allocator import keep_freed_memory

    keep_freed_memory()
    typer.run(main)
