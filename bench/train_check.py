"""Is a training run sound yet? FP FID of its current EMA weights at several uniform DDIM step counts.

A sound DDPM gets better (or no worse) with more steps; the issue with the first built-in model was the opposite.
Reads the run's last checkpoint without touching it, so it can watch a training that is still running. Also prints
the ε-prediction error by timestep on held-out images (--eps-by-t), beside the shipped model's: many-step samplers
spend most calls at small t, where a weak ε̂ re-injects noise that the next step does not remove. A DiT run (`tmpq
train --arch dit`) is scored the same way: its FID rows with classifier-free guidance (`--guidance-scale`, default
the built-in DiT's), its ε̂ unguided on the images' own labels, beside both shipped models'.

.venv/bin/python bench/train_check.py --run-dir /work/train_runs/builtin_v2 --num-samples 500 --steps 10,20,50,100
.venv/bin/python bench/train_check.py --run-dir /work/train_runs/builtin_v2 --steps "" --eps-by-t
.venv/bin/python bench/train_check.py --run-dir runs/fashion_dit_train30k --steps 10,20,50 --eps-by-t --threads 2
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer

from tmpq.data import load_fashion_mnist
from tmpq.evaluate import EvalConfig, evaluate, reference_metric
from tmpq.models.loading import BUILTIN_DIT_SPEC, BUILTIN_SPEC, load_model
from tmpq.models.train import snapshot_ema
from tmpq.sampling.conditioning import Conditioning, call_denoiser

EPS_TIMESTEPS = (0, 5, 10, 20, 50, 100, 200, 500, 900)


@torch.no_grad()
def eps_error_by_t(model: str, n: int = 512, seed: int = 0) -> dict[int, tuple[float, float]]:
    """Per timestep, on n Fashion-MNIST test images: the mean squared error of ε̂ against the true noise, and the
    share of the true noise ε̂ recovers on the black background (<ε̂, ε> / <ε, ε> over pixels at -1), where the noise
    is trivially identifiable: below 1, every small-t DDIM step leaves some of it in the image. A class-conditional
    model predicts unguided, on each image's own label (what its training targets)."""
    loaded = load_model(model)
    if loaded.kind == "class2image":
        loaded = load_model(model, guidance_scale=1.0)
    x0, labels = load_fashion_mnist("test", limit=n)
    a = loaded.schedule.alphas_cumprod
    background = x0 < -0.99
    cond = Conditioning.cycle(labels.long(), n) if loaded.kind == "class2image" else None
    out = {}
    for t in EPS_TIMESTEPS:
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + t))
        xt = a[t].sqrt() * x0 + (1 - a[t]).sqrt() * noise
        parts = []
        for i in range(0, n, 128):
            x = xt[i : i + 128]
            part_cond = None if cond is None else cond.select(i, i + len(x))
            parts.append(call_denoiser(loaded.denoiser, x, torch.full((len(x),), t), part_cond))
        eps = torch.cat(parts)
        recovered = float((eps * noise)[background].sum() / noise[background].pow(2).sum())
        out[t] = (float((eps - noise).pow(2).mean()), recovered)
    return out


def main(
    run_dir: Annotated[Path, typer.Option(help="a `tmpq train` run directory")],
    steps: Annotated[str, typer.Option(help="comma-separated uniform DDIM step counts")] = "10,20,50,100",
    num_samples: int = 500,
    seed: int = 0,
    schedule: str = "uniform",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    eps_by_t: Annotated[bool, typer.Option(help="also the ε̂ error by timestep, beside the shipped models'")] = False,
    guidance_scale: Annotated[float | None, typer.Option(help="a DiT run's guidance (default: the built-in's)")] = None,
) -> None:
    if threads:
        torch.set_num_threads(threads)
    metric = reference_metric("fashion-mnist")
    with tempfile.TemporaryDirectory() as tmp:
        weights = snapshot_ema(run_dir, Path(tmp) / "ema.safetensors")
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            step = (fh.metadata() or {}).get("steps_done", "?")
        loaded = load_model(str(weights))
        if loaded.kind == "class2image" and guidance_scale is not None:
            loaded = load_model(str(weights), guidance_scale=guidance_scale)
        if eps_by_t:
            named = [(f"step {step}", eps_error_by_t(str(weights)))]
            named += [(spec, eps_error_by_t(spec)) for spec in (BUILTIN_SPEC, BUILTIN_DIT_SPEC)]
            for col, what in ((0, "ε̂ MSE"), (1, "background noise recovered")):
                typer.echo(f"| {what} at t | " + " | ".join(map(str, EPS_TIMESTEPS)) + " |")
                typer.echo("|---|" + "---:|" * len(EPS_TIMESTEPS))
                for name, res in named:
                    typer.echo(f"| {name} | " + " | ".join(f"{res[t][col]:.4f}" for t in EPS_TIMESTEPS) + " |")
        rows = []
        for n in (int(v) for v in steps.split(",") if v.strip()):
            cfg = EvalConfig(model=str(weights), steps=n, schedule=schedule, num_samples=num_samples, seed=seed)
            res = evaluate(cfg, Path(tmp) / f"eval{n}", loaded=loaded, metric=metric, progress=False)
            rows.append((n, res.fid))
            typer.echo(f"step {step}: {schedule} {n} steps FID {res.fid:.2f}", err=True)
    if not rows:
        return
    typer.echo(f"| {run_dir} at training step {step} | " + " | ".join(f"{n} steps" for n, _ in rows) + " |")
    typer.echo("|---|" + "---:|" * len(rows))
    guided = f", guidance {float(loaded.denoiser.guidance_scale):g}" if loaded.kind == "class2image" else ""
    typer.echo(f"| FID ({num_samples} samples, {schedule}{guided}) | " + " | ".join(f"{f:.1f}" for _, f in rows) + " |")


if __name__ == "__main__":
    from tmpq.allocator import keep_freed_memory

    keep_freed_memory()  # as the tmpq command line does (docs/usage.md#speed-on-the-cpu)
    typer.run(main)
