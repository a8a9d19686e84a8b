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
    OMP_NUM_THREADS=1 .venv/bin/python bench/search_fid.py --fitness fid --fitness-samples 128
    OMP_NUM_THREADS=1 .venv/bin/python bench/search_fid.py --select-top 4   # + FID selection on seeds 5000-5999
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import typer

from tmpq.api import CompressionResult
from tmpq.cli import parse_ints
from tmpq.evaluate import reference_metric
from tmpq.models.loading import load_model
from tmpq.provenance import provenance
from tmpq.search import Budget, EvolutionConfig, FitnessConfig, SearchConfig, run_search
from tmpq.search.run import share_prepared
from tmpq.search.summary import RunSummary


def main(
    lever: str = "joint",
    fitness: str = typer.Option("proxy", help="proxy (paired distance to FP samples) | fid (against the data)"),
    fitness_samples: int = 64,
    proxy_stat: str = "mean",
    grouping: str = "uniform",
    steps: str = "10",
    phases: str = "",
    reference_steps: int = 100,
    seed_from: list[Path] = typer.Option([], help="finished search directories whose best candidates seed this one"),
    generations: int = typer.Option(10, help="of the tmpq preset (24 first candidates, then 16 per generation)"),
    num_samples: int = 5000,
    select_top: int = typer.Option(0, help="then pick among the proxy's top K by FID on held-out seeds"),
    select_samples: int = 1000,
    shared: Path = Path("runs/peers/shared"),
    out: Path | None = None,
) -> None:
    tag = f"{lever}_{grouping}_s{steps}_ph{phases or 'none'}_ref{reference_steps}_{proxy_stat}"
    tag += f"_{fitness}{fitness_samples}" if (fitness, fitness_samples) != ("proxy", 64) else ""
    tag += "_seeded" if seed_from else ""
    tag += f"_g{generations}" if generations != 10 else ""
    run = out or Path("runs/search_fid") / tag
    run.mkdir(parents=True, exist_ok=True)
    share_prepared(shared, run)  # one calibration for every row (each file is checked on reuse)
    cfg = SearchConfig(
        budget=Budget.like("W6A6", 10),
        steps=parse_ints(steps, "--steps"),
        grouping=grouping,
        phase_bounds=parse_ints(phases, "--phases") if phases else (),
        lever=lever,
        evolution=replace(EvolutionConfig.tmpq(seed=0), generations=generations),
        fitness=FitnessConfig(
            kind=fitness,
            num_samples=fitness_samples,
            seed=0,
            proxy_stat=proxy_stat,
            reference_steps=reference_steps,
        ),
        seed_from=tuple(str(p) for p in seed_from),
        final_samples=0,  # this script scores the best itself
    )
    t0 = time.time()
    run_search(load_model("builtin:fashion"), cfg, run, progress=False)
    wall = time.time() - t0
    search = RunSummary.read(run)
    config = {"num_samples": num_samples, "fid_seeds": [0, num_samples - 1], "search": cfg.to_dict()}
    metric = reference_metric("fashion-mnist")
    path = run / "fid5000.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    if res.get("config") != config:  # a finished run's score is reused
        res = _score(run, "search", metric, num_samples, 0) | {
            "best_proxy": search.best.value,
            "search_cost": search.search_cost.to_dict(),
            "wall_s": wall,
            "config": config,
            "provenance": provenance(),
        }
        path.write_text(json.dumps(res, indent=1))
    typer.echo(json.dumps({k: v for k, v in res.items() if k not in ("config", "provenance")}))
    if select_top > 1:
        _select(run, search, metric, select_top, select_samples, num_samples, res)


def _score(run: Path, which: str, metric, num_samples: int, seed: int) -> dict:
    """FID/IS (and FID of each half) of a run's candidate on `num_samples` images from seeds seed, seed+1, …"""
    s = CompressionResult.open(run).sampler(which)
    images = s.sample(num_samples, seed=seed, batch_size=100)
    score = metric.score(images, seed=0)
    half = num_samples // 2
    return {
        "fid": score.fid,
        "is": score.inception_score,
        "halves": [metric.fid(images[:half]), metric.fid(images[half:])],
        "timesteps": list(s.timesteps),
        "gbitops": s.bitops() / 1e9,
    }


def _select(run: Path, search: dict, metric, top: int, samples: int, num_samples: int, first: dict) -> None:
    """Pick among the search's `top` best (by its proxy) by FID on `samples` held-out seeds (from `num_samples` on,
    disjoint from the final FID's 0 … num_samples-1), then score the pick on the final seeds: what selecting with a
    little FID after a proxy search buys. Writes RUN/select.json."""
    held_out_seed = num_samples
    top = min(top, len(search["top"]))
    rows = []
    for k in range(1, top + 1):
        s = CompressionResult.open(run).sampler(f"search:{k}")
        images = s.sample(samples, seed=held_out_seed, batch_size=100)
        rows.append({"rank": k, "proxy": search["top"][k - 1]["value"], "fid_select": metric.fid(images)})
        typer.echo(json.dumps(rows[-1]))
    pick = min(rows, key=lambda r: r["fid_select"])["rank"]
    final = first if pick == 1 else _score(run, f"search:{pick}", metric, num_samples, 0)
    out = {
        "rows": rows,
        "pick": pick,
        "final": {k: v for k, v in final.items() if k not in ("config", "provenance")},
        "select_cost_forwards": samples * sum(len(search["top"][k]["candidate"]["timesteps"]) for k in range(top)),
        "config": {"top": top, "samples": samples, "held_out_seeds": [held_out_seed, held_out_seed + samples - 1]},
        "provenance": provenance(),
    }
    (run / "select.json").write_text(json.dumps(out, indent=1))
    typer.echo(json.dumps({"pick": pick, **out["final"]}))


if __name__ == "__main__":
    from tmpq.allocator import keep_freed_memory

    keep_freed_memory()  # as the tmpq command line does (docs/usage.md#speed-on-the-cpu)
    typer.run(main)
