"""FP quality of a class-conditional model at several classifier-free guidance scales: how the built-in DiT's default
guidance was chosen (FID against the data rewards diversity, so the best scale is lower than ImageNet's 4.0).

    .venv/bin/python bench/guidance.py --scales 1,1.5,2,3,4 --steps 20 --num-samples 1000 --out runs/dit_guidance
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer

from tmpq.device import device_name
from tmpq.evaluate import EvalConfig, evaluate, reference_metric
from tmpq.fileio import write_json_atomic
from tmpq.models.loading import load_model


def main(
    model: str = "builtin:fashion-dit",
    scales: str = "1,1.5,2,3,4",
    steps: int = 20,
    schedule: str = "uniform",
    num_samples: int = 1000,
    out: Path = Path("runs/dit_guidance"),
    threads: int | None = None,
) -> None:
    if threads:
        torch.set_num_threads(threads)
    metric = reference_metric("fashion-mnist")
    rows = []
    for g in (float(s) for s in scales.split(",")):
        loaded = load_model(model, guidance_scale=g)
        cfg = EvalConfig(model=model, steps=steps, schedule=schedule, num_samples=num_samples)
        t0 = time.time()
        with torch.no_grad():
            res = evaluate(cfg, out / f"g{g:g}", loaded=loaded, metric=metric, progress=False)
        rows.append({"guidance_scale": g, "fid": res.fid, "fid_halves": res.fid_halves, "is": res.inception_score})
        typer.echo(f"g = {g:g}: FID {res.fid:.2f}  IS {res.inception_score:.3f}  ({time.time() - t0:.0f} s)", err=True)
    write_json_atomic(
        out / "guidance.json",
        {
            "model": model,
            "steps": steps,
            "schedule": schedule,
            "num_samples": num_samples,
            "rows": rows,
            "device": device_name(),
        },
        indent=2,
    )
    print(
        f"\n{model}, FP, {steps} {schedule} DDIM steps, {num_samples} samples (seed i, class i mod 10), "
        f"{device_name()}\n"
    )
    print("| guidance scale | FID ↓ | FID halves | IS ↑ |")
    print("|---:|---:|---|---:|")
    for r in rows:
        halves = " / ".join(f"{h:.1f}" for h in r["fid_halves"]) if r["fid_halves"] else "—"
        print(f"| {r['guidance_scale']:g} | {r['fid']:.2f} | {halves} | {r['is']:.3f} |")


if __name__ == "__main__":
    typer.run(main)
