"""One tmpq-preset search at the W6A6@10 budget (uniform groups, 64-sample proxy, as bench/peers.py's search rows)
with a chosen lever and proxy statistic, its best scored by FID/IS on 5,000 samples (seeds 0-4999) and two halves.

Reuses bench/peers.py's calibration (runs/peers/shared) when present. Writes RUN/fid5000.json.

    OMP_NUM_THREADS=1 .venv/bin/python bench/search_fid.py --lever bits --proxy-stat median
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import typer

from tmpq.api import sampler_from_run
from tmpq.evaluate import reference_metric
from tmpq.models.loading import load_model
from tmpq.search import Budget, EvolutionConfig, FitnessConfig, SearchConfig, run_search


def main(
    lever: str = "joint",
    proxy_stat: str = "median",
    num_samples: int = 5000,
    shared: Path = Path("runs/peers/shared"),
    out: Path | None = None,
) -> None:
    run = out or Path(f"runs/proxystat_{lever}_{proxy_stat}")
    run.mkdir(parents=True, exist_ok=True)
    for name in ("calib.safetensors", "supernet", "model.json", "sensitivity.json"):
        src = shared / name
        if src.exists() and not (run / name).exists():
            (shutil.copytree if src.is_dir() else shutil.copy)(src, run / name)
    cfg = SearchConfig(
        budget=Budget.like("W6A6", 10),
        steps=(10,),
        grouping="uniform",
        lever=lever,
        evolution=EvolutionConfig.tmpq(seed=0),
        fitness=FitnessConfig(kind="proxy", num_samples=64, seed=0, proxy_stat=proxy_stat),
    )
    t0 = time.time()
    run_search(load_model("builtin:fashion"), cfg, run, progress=False)
    wall = time.time() - t0
    s = sampler_from_run(run, "search")
    images = s.sample(num_samples, seed=0, batch_size=100)
    metric = reference_metric("fashion-mnist")
    score = metric.score(images, seed=0)
    half = num_samples // 2
    res = {
        "config": {"lever": lever, "proxy_stat": proxy_stat, "num_samples": num_samples, "search": cfg.to_json()},
        "fid": score.fid,
        "is": score.inception_score,
        "halves": [metric.fid(images[:half]), metric.fid(images[half:])],
        "timesteps": list(s.timesteps),
        "gbitops": s.bitops() / 1e9,
        "search_wall_s": wall,
    }
    (run / "fid5000.json").write_text(json.dumps(res, indent=1))
    typer.echo(json.dumps({k: v for k, v in res.items() if k != "config"}))


if __name__ == "__main__":
    typer.run(main)
