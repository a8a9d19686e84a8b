"""How well does the cheap paired proxy rank candidates the way FID does? Spearman ρ over random candidates.

Draws candidates of the joint space at a budget (random schedules inside the quad groups, random bits,
repaired into the budget), scores each with the proxy (few samples) and with FID (many samples), same
seeds for all, and prints the rank correlation. Resumable: scores are kept in OUT/scores.json.

Random candidates span a wide range of quality, where any sensible proxy ranks well. What matters for a search is
the ranking among the candidates it actually visits: `--from-run RUN` takes them from a finished search instead
(`--pick spread`: `--candidates` of them spread over the run's fitness range, every k-th; `--pick top`: the best
`--candidates` by the run's own fitness, where a search has to tell close candidates apart).

    .venv/bin/python bench/proxy_correlation.py --candidates 24 --proxy-samples 64 --fid-samples 1000
    .venv/bin/python bench/proxy_correlation.py --from-run runs/demo --candidates 16 --out runs/proxy_corr_demo
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import typer
from scipy.stats import spearmanr

from tmpq.evaluate import reference_metric
from tmpq.models.loading import load_model
from tmpq.quant.prepare import prepare_supernet
from tmpq.search import Budget, Candidate, CandidateCost, FitnessConfig, Repairer, SampleFitness, SearchSpace


def main(
    candidates: int = 24,
    proxy_samples: int = 64,
    fid_samples: int = 1000,
    like: str = "W6A6",
    steps: int = 10,
    seed: int = 0,
    out: Path = Path("runs/proxy_corr"),
    from_run: Path | None = None,
    pick: str = "spread",
) -> None:
    start = time.time()
    loaded = load_model("builtin:fashion")
    sn, _, _ = prepare_supernet(loaded, out)
    space = SearchSpace.from_supernet(sn, steps=(steps,))
    cost = CandidateCost(space, sn.cost)
    budget = Budget.like(like, steps).resolve(cost)
    rng = random.Random(seed)
    b = Budget.like(like, steps)
    cands = [space.candidate(space.default_timesteps(steps), space.uniform_bits(b.w, b.a))]  # the uniform baseline
    if from_run is not None:
        records = json.loads((from_run / "search_state.json").read_text())["records"].values()
        ranked = sorted(records, key=lambda r: r["value"])
        step = max(1, len(ranked) // candidates) if pick == "spread" else 1  # 'top': the best ones only
        cands = [Candidate.from_json(r["candidate"]) for r in ranked[::step][:candidates]]
    rep = Repairer(cost)
    while len(cands) < candidates:
        c = rep.repair(space.random(rng), budget)
        if c is not None and c.key not in {x.key for x in cands}:
            cands.append(c)
    metric = reference_metric("fashion-mnist")
    args = (sn, space, loaded.schedule, loaded.sample_shape, metric)
    proxy = SampleFitness(*args, FitnessConfig("proxy", proxy_samples, seed))
    fid = SampleFitness(*args, FitnessConfig("fid", fid_samples, seed))
    path = out / "scores.json"
    scores = json.loads(path.read_text()) if path.is_file() else {}
    for i, c in enumerate(cands):
        if c.key in scores:
            continue
        scores[c.key] = {"proxy": proxy(c).value, "fid": fid(c).value, "bitops": cost.bitops(c)}
        path.write_text(json.dumps(scores, indent=1))
        r = scores[c.key]
        typer.echo(f"{i + 1}/{len(cands)}: proxy {r['proxy']:.3f}  FID {r['fid']:.2f}", err=True)
    rows = [scores[c.key] for c in cands]
    rho = spearmanr([r["proxy"] for r in rows], [r["fid"] for r in rows])
    typer.echo(
        f"Spearman rho(proxy@{proxy_samples}, FID@{fid_samples}) over {len(rows)} candidates: "
        f"{rho.statistic:.3f} (p = {rho.pvalue:.2g}); {time.time() - start:.0f} s"
    )


if __name__ == "__main__":
    typer.run(main)
