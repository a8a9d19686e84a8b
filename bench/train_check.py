"""Is a training run sound yet? FP FID of its current EMA weights at several uniform DDIM step counts.

A sound DDPM gets better (or no worse) with more steps; the issue with the first built-in model was the opposite.
Reads the run's last checkpoint without touching it, so it can watch a training that is still running.

.venv/bin/python bench/train_check.py --run-dir /work/train_runs/builtin_v2 --num-samples 500 --steps 10,20,50,100
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer

from tmpq.evaluate import EvalConfig, evaluate, reference_metric
from tmpq.models.train import snapshot_ema


def main(
    run_dir: Annotated[Path, typer.Option(help="a `tmpq train` run directory")],
    steps: Annotated[str, typer.Option(help="comma-separated uniform DDIM step counts")] = "10,20,50,100",
    num_samples: int = 500,
    seed: int = 0,
    schedule: str = "uniform",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
) -> None:
    if threads:
        torch.set_num_threads(threads)
    metric = reference_metric("fashion-mnist")
    with tempfile.TemporaryDirectory() as tmp:
        weights = snapshot_ema(run_dir, Path(tmp) / "ema.safetensors")
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            step = (fh.metadata() or {}).get("steps_done", "?")
        rows = []
        for n in (int(v) for v in steps.split(",")):
            cfg = EvalConfig(model=str(weights), steps=n, schedule=schedule, num_samples=num_samples, seed=seed)
            res = evaluate(cfg, Path(tmp) / f"eval{n}", metric=metric, progress=False)
            rows.append((n, res.fid))
            typer.echo(f"step {step}: {schedule} {n} steps FID {res.fid:.2f}", err=True)
    typer.echo(f"| {run_dir} at training step {step} | " + " | ".join(f"{n} steps" for n, _ in rows) + " |")
    typer.echo("|---|" + "---:|" * len(rows))
    typer.echo(f"| FID ({num_samples} samples, {schedule}) | " + " | ".join(f"{f:.1f}" for _, f in rows) + " |")


if __name__ == "__main__":
    typer.run(main)
