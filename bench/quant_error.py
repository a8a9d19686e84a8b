"""Where does quantization hurt? Relative ε̂ error of uniform settings per timestep, on the built-in model.

For each setting (and W-only / A-only variants) prints the relative MSE of the denoiser output against FP
on calibration-style inputs (FP DDIM trajectories) at each timestep. Reuses OUT's calibrated super-network.

    .venv/bin/python bench/quant_error.py --out runs/ptq
    .venv/bin/python bench/quant_error.py --quantize-input --settings W8A8 --out runs/ptq_input8   # x_t at 8 bits
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import typer

from tmpq.models.loading import load_model
from tmpq.quant import QuantConfig, QuantSpec
from tmpq.quant.prepare import prepare_supernet


def main(
    settings: str = "W8A8,W6A6,W4A8",
    per_t: int = 16,
    out: Path = Path("runs/ptq"),
    quantize_input: bool = typer.Option(False, help="also quantize conv_in's input x_t (pin W8A8 instead of W8A-FP)"),
) -> None:
    loaded = load_model("builtin:fashion")
    spec = QuantSpec(reconstruction=None)
    spec = replace(spec, pin=(("*conv_in", 8, 8), ("*conv_out", 8, 8))) if quantize_input else spec
    sn, calib, _ = prepare_supernet(loaded, out, spec=spec)
    ts = sorted(set(calib.t.tolist()))
    rows = []
    with torch.no_grad():
        x = torch.cat([calib.x[calib.t == t][:per_t] for t in ts])
        t = torch.cat([calib.t[calib.t == t][:per_t] for t in ts])
        sn.set_fp()
        ref = sn(x, t)
        for s in settings.split(","):
            w, a = int(s[1]), int(s[3])
            full = sn.uniform_config(w, a).as_dict()
            variants = {
                s: full,
                f"{s} weights only": {n: (wb, None) for n, (wb, _) in full.items()},
                f"{s} activations only": {n: (None, ab) for n, (_, ab) in full.items()},
            }
            for label, bits in variants.items():
                sn.set_config(QuantConfig.from_mapping(bits))
                y = sn(x, t)
                errs = [float((y[t == tt] - ref[t == tt]).pow(2).mean() / ref[t == tt].pow(2).mean()) for tt in ts]
                rows.append((label, errs))
    head = "| setting | " + " | ".join(f"t={tt}" for tt in ts) + " |"
    typer.echo(head + "\n|:---|" + "---:|" * len(ts))
    for label, errs in rows:
        typer.echo(f"| {label} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")


if __name__ == "__main__":
    from tmpq.allocator import keep_freed_memory

    keep_freed_memory()  # as the tmpq command line does (docs/usage.md#speed-on-the-cpu)
    typer.run(main)
