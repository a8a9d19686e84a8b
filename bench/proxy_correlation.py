"""How well does each cheap fitness rank candidates the way the truth does? Spearman ρ against two truths on held-out
seeds: FID against the data, and FID to FP-100 (against the FP model's 100-step samples from the same held-out seeds,
fidelity as MixDQ and ViDiT-Q judge it).

Draws candidates of the joint space at a budget (random schedules inside the quad groups, random bits,
repaired into the budget), or takes them from a finished search (`--from-run RUN`; `--pick spread`: spread over the
run's fitness range, `--pick top`: its best, where a search has to tell close candidates apart). Each candidate is
sampled once on the fitness seeds (0…N-1, N the largest fitness sample count) and once on the truth seeds
(`--truth-seed` onwards, disjoint from the fitness seeds so a fitness cannot share the truth's sampling noise).
Every fitness in `--fitness` is scored on a prefix of the same fitness samples:

- `proxy:N` the paired proxy (mean per-sample feature distance to FP at `--reference-steps` from the same noise),
- `proxy-median:N` the same pooled by the median,
- `fid:N` FID against the real data on N samples,
- `kid:N` KID against the real data on N samples,
- `fid-to-fp:N` FID against the FP model's samples at `--reference-steps` from the same N seeds.

Resumable: scores are kept in OUT/scores.json (keyed by candidate; a fitness added later is computed then), the FP
samples on the truth seeds in OUT/fp_truth_<steps>_<samples>_<seed>.safetensors.

    .venv/bin/python bench/proxy_correlation.py --from-run runs/demo --pick top --candidates 12 \
        --fitness proxy:64,fid:128,fid-to-fp:128 --truth-samples 1000 --out runs/proxy_corr_top
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import typer
from scipy.stats import spearmanr

from tmpq.evaluate import reference_metric
from tmpq.fileio import read_images, save_images_atomic
from tmpq.models.loading import load_model
from tmpq.quant.prepare import prepare_supernet
from tmpq.search import Budget, Candidate, CandidateCost, FitnessConfig, Repairer, SampleFitness, SearchSpace


def _parse(spec: str) -> list[tuple[str, int]]:
    out = []
    for item in spec.split(","):
        kind, _, n = item.partition(":")
        if kind not in ("proxy", "proxy-median", "fid", "kid", "fid-to-fp") or not n.isdigit():
            raise typer.BadParameter(f"{item!r}: use proxy:N, proxy-median:N, fid:N, kid:N or fid-to-fp:N")
        out.append((kind, int(n)))
    return out


def main(
    candidates: int = 24,
    fitness: str = "proxy:64,fid:128,fid:256",
    truth_samples: int = 1000,
    truth_seed: int = 10_000,
    reference_steps: int = 100,
    like: str = "W6A6",
    steps: int = 10,
    seed: int = 0,
    out: Path = Path("runs/proxy_corr"),
    from_run: Path | None = None,
    pick: str = "spread",
) -> None:
    start = time.time()
    kinds = _parse(fitness)
    loaded = load_model("builtin:fashion")
    sn, _, _ = prepare_supernet(loaded, from_run or out)
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
    n_fit = max(n for _, n in kinds)
    sampler = SampleFitness(*args, FitnessConfig("fid", n_fit, seed))
    truth = SampleFitness(*args, FitnessConfig("fid", truth_samples, truth_seed))
    fp_path = out / f"fp_truth_{reference_steps}_{truth_samples}_{truth_seed}.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    if not fp_path.is_file():
        save_images_atomic(fp_path, truth.fp_samples(loaded.schedule.timesteps("uniform", reference_steps)))
    fp_truth = metric.stats(read_images(fp_path))
    # one FP reference on the fitness seeds, shared by every paired fitness (a prefix of it for fewer samples)
    paired = SampleFitness(*args, FitnessConfig("proxy", n_fit, seed, reference_steps=reference_steps))
    fitnesses = {
        n: SampleFitness(
            *args,
            FitnessConfig("proxy", n, seed, reference_steps=reference_steps),
            reference=paired.fp_reference()[:n],
        )
        for kind, n in kinds
        if kind not in ("fid", "kid")
    }
    path = out / "scores.json"
    scores = json.loads(path.read_text()) if path.is_file() else {}
    truths = {
        "fid": f"truth:{truth_samples}@{truth_seed}",
        "fid to FP": f"truth-to-fp{reference_steps}:{truth_samples}@{truth_seed}",
    }
    for i, c in enumerate(cands):
        row = scores.setdefault(c.key, {"bitops": cost.bitops(c)})
        if any(t not in row for t in truths.values()):
            with torch.no_grad():
                images = truth.samples(c)
            row[truths["fid"]] = metric.fid(images)
            row[truths["fid to FP"]] = metric.fid_between(images, reference_stats=fp_truth)
        missing = [(k, n) for k, n in kinds if f"{k}:{n}" not in row]
        if missing:
            with torch.no_grad():
                images = sampler.samples(c)
            for kind, n in missing:
                if kind == "fid":
                    row[f"{kind}:{n}"] = metric.fid(images[:n])
                elif kind == "kid":
                    row[f"{kind}:{n}"] = metric.kid(images[:n])
                elif kind == "fid-to-fp":
                    row[f"{kind}:{n}"] = fitnesses[n].fid_to_fp(images[:n])
                else:
                    row[f"{kind}:{n}"] = _pooled(fitnesses[n], images[:n], median=kind == "proxy-median")
        path.write_text(json.dumps(scores, indent=1))
        shown = "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "bitops")
        typer.echo(f"{i + 1}/{len(cands)}: {shown}", err=True)
    rows = [scores[c.key] for c in cands]
    typer.echo(f"{len(rows)} candidates, truth on {truth_samples} samples from seed {truth_seed}")
    for name, tkey in truths.items():
        gt = [r[tkey] for r in rows]
        typer.echo(f"\ntruth: {name}" + (f"-{reference_steps}" if name != "fid" else ""))
        typer.echo("| fitness | Spearman ρ | p | truth of the fitness's pick | its truth rank |")
        typer.echo("|---|---:|---:|---:|---:|")
        order = sorted(range(len(rows)), key=lambda j: gt[j])
        for kind, n in kinds:
            vals = [r[f"{kind}:{n}"] for r in rows]
            rho = spearmanr(vals, gt)
            pick_j = min(range(len(rows)), key=lambda j: vals[j])
            typer.echo(
                f"| {kind}:{n} | {rho.statistic:.3f} | {rho.pvalue:.2g} | {gt[pick_j]:.2f} | "
                f"{order.index(pick_j) + 1} |"
            )
        other = [t for t in truths.values() if t != tkey][0]
        typer.echo(
            f"best truth {min(gt):.2f}; ρ with the other truth {spearmanr([r[other] for r in rows], gt).statistic:.3f}"
        )
    typer.echo(f"the uniform baseline is candidate 1 when not --from-run; {time.time() - start:.0f} s")


def _pooled(p: SampleFitness, images: torch.Tensor, median: bool) -> float:
    """The paired proxy on `images`, pooled by the mean or the median."""
    ref = p.metric.features(p.fp_reference())
    d = (p.metric.features(images) - ref).pow(2).sum(dim=1)
    return float(d.median() if median else d.mean())


if __name__ == "__main__":
    from tmpq.allocator import keep_freed_memory

    keep_freed_memory()  # as the tmpq command line does (docs/usage.md#speed-on-the-cpu)
    typer.run(main)
