"""Where along t does a class-conditional model lose quality as it gets more sampling steps?

A sound model's FID falls with DDIM steps to a plateau; the built-in DiT's rises beyond 20. This splits the
trajectory at timestep `--split` and scores samplers that differ only on one side of it (FP, the same seeds and
classes for every row): fine steps above and coarse below, and the reverse, guided and unguided; classifier-free
guidance only above the split (guidance limited to an interval of noise levels, Kynkäänniemi et al. 2024) or only
below it; and the built-in UNet taking over below it. `--rows` picks some of them. Whichever side's fine steps cost
what 100 uniform steps cost is where the model's ε̂ field goes wrong.

    .venv/bin/python bench/step_regions.py --num-samples 500 --out runs/dit_step_regions --threads 2
    .venv/bin/python bench/step_regions.py --clip --num-samples 500 --out runs/dit_step_regions_clip
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import typer

from tmpq.device import device_name
from tmpq.evaluate import reference_metric
from tmpq.fileio import write_json_atomic
from tmpq.models.loading import BUILTIN_SPEC, load_model
from tmpq.sampling.conditioning import Conditioning, call_denoiser
from tmpq.sampling.ddim import DDIMSampler, generate
from tmpq.sampling.schedules import uniform_timesteps


class SplitDenoiser(torch.nn.Module):
    """`high` for timesteps >= split, `low` below it; `low` may be unconditional (then it gets no labels)."""

    def __init__(self, high: Callable, low: Callable, split: int, low_conditional: bool = True) -> None:
        super().__init__()
        self.high, self.low, self.split, self.low_conditional = high, low, split, low_conditional

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        if int(t[0]) >= self.split:
            return call_denoiser(self.high, x, t, cond)
        return call_denoiser(self.low, x, t, cond if self.low_conditional else None)


def spaced(start: int, stop: int, stride: int) -> list[int]:
    """start, start - stride, ... down to (and including) stop."""
    return list(range(start, stop - 1, -stride))


def main(
    model: str = "builtin:fashion-dit",
    split: int = 300,
    num_samples: int = 500,
    out: Path = Path("runs/dit_step_regions"),
    threads: int | None = None,
    rows: str = "all",
    clip: bool | None = typer.Option(None, help="DDIM's x̂0 clipping on or off (default: what the model declares)"),
    guidance_scale: float | None = typer.Option(None, help="the guided rows' scale (default: the model's)"),
) -> None:
    if threads:
        torch.set_num_threads(threads)
    guided = load_model(model, guidance_scale=guidance_scale)
    plain = load_model(model, guidance_scale=1.0)
    unet = load_model(BUILTIN_SPEC)
    g = float(guided.denoiser.guidance_scale)
    fine, coarse = 10, 50  # 100 and 20 uniform steps' strides
    fine_hi, coarse_hi = spaced(990, split, fine), spaced(950, split, coarse)
    fine_lo = spaced(range(0, split, fine)[-1], 0, fine)
    coarse_lo = spaced(range(0, split, coarse)[-1], 0, coarse)
    guide_hi = SplitDenoiser(guided.denoiser, plain.denoiser, split)
    guide_lo = SplitDenoiser(plain.denoiser, guided.denoiser, split)
    unet_lo = SplitDenoiser(guided.denoiser, unet.denoiser, split, low_conditional=False)
    u20, u100 = uniform_timesteps(20, 1000), uniform_timesteps(100, 1000)
    table = {  # id: (row name, denoiser, timesteps)
        "u20": ("20 uniform steps", guided.denoiser, u20),
        "u100": ("100 uniform steps", guided.denoiser, u100),
        "fine-hi": (f"fine above {split}, coarse below", guided.denoiser, fine_hi + coarse_lo),
        "fine-lo": (f"coarse above {split}, fine below", guided.denoiser, coarse_hi + fine_lo),
        "guide-hi": (f"100 steps, guidance only at t >= {split}", guide_hi, u100),
        "guide-hi20": (f"20 steps, guidance only at t >= {split}", guide_hi, u20),
        "guide-lo": (f"100 steps, guidance only at t < {split}", guide_lo, u100),
        "unet-lo": (f"100 steps, the UNet below {split}", unet_lo, u100),
        "plain100": ("100 steps unguided", plain.denoiser, u100),
        "plain20": ("20 steps unguided", plain.denoiser, u20),
        "plain-fine-hi": (f"unguided, fine above {split}, coarse below", plain.denoiser, fine_hi + coarse_lo),
        "plain-fine-lo": (f"unguided, coarse above {split}, fine below", plain.denoiser, coarse_hi + fine_lo),
    }
    picked = list(table) if rows == "all" else rows.split(",")
    unknown = [r for r in picked if r not in table]
    if unknown:
        raise typer.BadParameter(f"unknown rows {unknown}; choose from {', '.join(table)}")
    rows_run = {table[r][0]: table[r][1:] for r in picked}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "step_regions.json"
    clip_sample = guided.schedule.clip_sample if clip is None else clip
    config = {"model": model, "guidance_scale": g, "clip_sample": clip_sample, "num_samples": num_samples, "seed": 0}
    saved = json.loads(path.read_text()) if path.exists() else {"config": config, "rows": {}}
    if saved["config"] != config:
        raise typer.BadParameter(f"{path} holds rows of another setting ({saved['config']}); pass another --out")
    done = saved["rows"]
    metric = reference_metric("fashion-mnist")
    cond = guided.conditioning(num_samples)
    for name, (den, ts) in rows_run.items():
        if name not in done:
            start = time.perf_counter()
            sampler = DDIMSampler(guided.schedule, ts, clip_sample=clip_sample)
            images = generate(den, sampler, num_samples, guided.sample_shape, cond=cond)
            fid, wall = metric.fid(images), time.perf_counter() - start
            done[name] = {"steps": len(ts), "timesteps": ts, "fid": fid, "wall_s": wall}
            write_json_atomic(path, {"config": config, "device": device_name(), "rows": done})
        print(f"{name:45s} {done[name]['steps']:4d} steps  FID {done[name]['fid']:8.2f}", flush=True)
    print(f"\n{model}, guidance {g} (where guided), x̂0 clipping {clip_sample}, {num_samples} samples, {device_name()}")
    print("| sampler | steps | FID ↓ |\n|---|---:|---:|")
    for name, row in done.items():
        print(f"| {name} | {row['steps']} | {row['fid']:.2f} |")


if __name__ == "__main__":
    typer.run(main)
