"""How well FID and KID on a search's sample count tell samplers apart, paired as a search compares candidates.

Samples the FP model on three 10-step schedules (uniform, quad and the built-in model's measured 'change'
schedule, whose FP FIDs on 1,000 samples are 83.51, 107.60 and 85.85) from seeds 0…S·N-1, splits them into S
disjoint seed sets of N, and scores each set by FID and KID against the training data. A search compares
candidates on one seed set, so what matters is the *paired* difference between two samplers across seed sets:
its mean over its spread (z) says how reliably one set of N samples ranks them. Also prints each metric on all
S·N samples and on sets of 2N.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fitness_noise.py --sets 8 --samples 128
"""

from __future__ import annotations

import json
import statistics as st
from pathlib import Path

import typer

from tmpq.evaluate import reference_metric
from tmpq.models.loading import load_model
from tmpq.provenance import provenance
from tmpq.sampling.ddim import DDIMSampler, generate
from tmpq.sampling.schedules import make_timesteps

CHANGE_10 = [878, 736, 602, 483, 364, 252, 154, 73, 23, 0]
"""The 'change' grouping's default 10-step schedule on the built-in model (docs/search.md)."""


def main(sets: int = 8, samples: int = 128, out: Path = Path("runs/fitness_noise.json")) -> None:
    loaded = load_model("builtin:fashion")
    T = loaded.schedule.num_train_timesteps
    schedules = {
        "uniform": make_timesteps("uniform", 10, T),
        "quad": make_timesteps("quad", 10, T),
        "change": CHANGE_10,
    }
    metric = reference_metric("fashion-mnist")
    n, res = samples, {}
    for name, ts in schedules.items():
        images = generate(loaded.denoiser, DDIMSampler(loaded.schedule, ts), n * sets, loaded.sample_shape, 0, 128)
        chunks = {size: [images[i : i + size] for i in range(0, n * sets, size)] for size in (n, 2 * n)}
        res[name] = {
            f"{m}:{size}": [float(getattr(metric, m)(c)) for c in chunks[size]]
            for m in ("fid", "kid")
            for size in chunks
        } | {f"fid:{n * sets}": metric.fid(images), f"kid:{n * sets}": metric.kid(images)}
        typer.echo(f"{name}: " + json.dumps({k: v for k, v in res[name].items() if not isinstance(v, list)}))
    typer.echo("\n| pair | metric | mean paired difference | its spread | z | one sampler's spread across sets |")
    typer.echo("|---|---|---:|---:|---:|---:|")
    for a, b in (("uniform", "quad"), ("uniform", "change")):
        for key in (f"fid:{n}", f"kid:{n}", f"fid:{2 * n}", f"kid:{2 * n}"):
            diff = [x - y for x, y in zip(res[a][key], res[b][key])]
            mean, spread, alone = st.mean(diff), st.stdev(diff), st.stdev(res[a][key])
            typer.echo(f"| {a} − {b} | {key} | {mean:.2f} | {spread:.2f} | {mean / spread:.2f} | {alone:.2f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"config": {"sets": sets, "samples": samples}, "scores": res, "provenance": provenance()})
    )


if __name__ == "__main__":
    typer.run(main)
