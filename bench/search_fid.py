"""One tmpq-preset search at the W6A6@10 budget, its best scored by FID/IS on 5,000 samples (seeds 0-4999) and
two halves: the way each search option of issue 4 is measured against the reference setting.

The reference setting is bench/peers.py's joint row: uniform groups, 10 steps, one bit allocation, the
64-sample paired proxy (mean) against the FP model at 100 uniform steps, the tmpq preset, seed 0. Each flag
changes one thing. Reuses bench/peers.py's calibration and super-network (runs/peers/shared) when present, so
every row shares one calibration. Writes OUT/fid5000.json (with the config that produced it).

    OMP_NUM_THREADS=1 .venv/bin/python bench/search_fid.py --grouping change
    OMP_NUM_THREADS=1 .venv/bin/python bench/search_fid.py --steps 8-12
    OMP_NUM_THREADS=1 .venv/bin/python bench/search_fid.py --phases 500
    OMP_NUM_THREADS=1 .venv/bin/python bench/search_fid.py --reference-steps 20
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
from tmpq.provenance import provenance
from tmpq.search import Budget, EvolutionConfig, FitnessConfig, SearchConfig, run_search

SHARED_FILES = ("calib.safetensors", "supernet", "model.json", "sensitivity.json")
"""Prepared once by bench/peers.py; each is keyed by its inputs inside, so a mismatch is recomputed, not reused."""


def _ints(text: str) -> tuple[int, ...]:
    if "-" in text and "," not in text:
        lo, hi = (int(v) for v in text.split("-"))
        return tuple(range(lo, hi + 1))
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(
    lever: str = "joint",
    proxy_stat: str = "mean",
    grouping: str = "uniform",
    steps: str = "10",
    phases: str = "",
    reference_steps: int = 100,
    seed_from: list[Path] = typer.Option([], help="finished search directories whose best candidates seed this one"),
    num_samples: int = 5000,
    shared: Path = Path("runs/peers/shared"),
    out: Path | None = None,
) -> None:
    tag = f"{lever}_{grouping}_s{steps}_ph{phases or 'none'}_ref{reference_steps}_{proxy_stat}"
    tag += "_seeded" if seed_from else ""
    run = out or Path("runs/search_fid") / tag
    run.mkdir(parents=True, exist_ok=True)
    for name in SHARED_FILES:
        src = shared / name
        if src.exists() and not (run / name).exists():
            (shutil.copytree if src.is_dir() else shutil.copy)(src, run / name)
    cfg = SearchConfig(
        budget=Budget.like("W6A6", 10),
        steps=_ints(steps),
        grouping=grouping,
        phase_bounds=_ints(phases) if phases else (),
        lever=lever,
        evolution=EvolutionConfig.tmpq(seed=0),
        fitness=FitnessConfig(
            kind="proxy", num_samples=64, seed=0, proxy_stat=proxy_stat, reference_steps=reference_steps
        ),
        seed_from=tuple(str(p) for p in seed_from),
    )
    t0 = time.time()
    run_search(load_model("builtin:fashion"), cfg, run, progress=False)
    wall = time.time() - t0
    search = json.loads((run / "search.json").read_text())
    s = sampler_from_run(run, "search")
    images = s.sample(num_samples, seed=0, batch_size=100)
    metric = reference_metric("fashion-mnist")
    score = metric.score(images, seed=0)
    half = num_samples // 2
    res = {
        "fid": score.fid,
        "is": score.inception_score,
        "halves": [metric.fid(images[:half]), metric.fid(images[half:])],
        "timesteps": list(s.timesteps),
        "gbitops": s.bitops() / 1e9,
        "best_proxy": search["best"]["value"],
        "search_cost": search["search_cost"],
        "wall_s": wall,
        "config": {"num_samples": num_samples, "fid_seeds": [0, num_samples - 1], "search": cfg.to_json()},
        "provenance": provenance(),
    }
    (run / "fid5000.json").write_text(json.dumps(res, indent=1))
    typer.echo(json.dumps({k: v for k, v in res.items() if k not in ("config", "provenance")}))


if __name__ == "__main__":
    typer.run(main)
