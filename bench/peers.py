"""The peers table (issue 6): the joint search against every single-lever baseline on the built-in model.

One run, one seed set (sample i from seed SEED + i), one sample count for every row's final FID/IS. Each row is
written atomically to OUT/rows/NAME.json with its full config as soon as it is done, and a re-run skips rows
whose config is unchanged; searches resume inside their own run directory (OUT/runs/NAME). All rows share one
calibration set, super-network, layer sensitivity and proxy reference (made once in OUT/shared, copied into
each search directory), so their costs differ only by what the row itself does.

    OMP_NUM_THREADS=2 .venv/bin/python bench/peers.py --out runs/peers

Writes OUT/peers.md (table + notes), OUT/peers.json (config, rows, versions) and OUT/peers.png (FID vs BitOPs).
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated

import torch
import typer

from tmpq.api import CompressionResult
from tmpq.compressed import CompressedSampler
from tmpq.evaluate import EvalConfig, reference_metric
from tmpq.fileio import write_json_atomic
from tmpq.metrics.fid import QualityMetric
from tmpq.models.loading import load_model
from tmpq.provenance import file_sha256, provenance
from tmpq.quant import CalibConfig, QuantSpec
from tmpq.quant.prepare import prepare_supernet
from tmpq.sampling.ddim import DDIMSampler, generate
from tmpq.sampling.schedules import make_timesteps
from tmpq.search import Budget, EvolutionConfig, Execution, FitnessConfig, SearchConfig, run_search
from tmpq.search.run import share_prepared
from tmpq.search.summary import RunSummary


@dataclass(frozen=True)
class Row:
    """One row of the table: what produces its sampler."""

    name: str
    label: str
    kind: str  # fp | ptq | search
    steps: int = 10
    schedule: str = "quad"
    precision: tuple[int, int] | None = None  # ptq: (w, a)
    search: SearchConfig | None = None


def rows_spec(
    fitness: str,
    fitness_samples: int,
    generations: int,
    ref_fitness_samples: int,
    ref_generations: int,
    tight: str,
    seed: int,
    grouping: str,
    quant: QuantSpec = QuantSpec(),
) -> list[Row]:
    """The rows of issue 6, most telling first (so a run cut short still answers the main question; the table
    sorts rows by BitOPs). The three tmpq-engine searches (joint, bits-only, timesteps-only) share everything but
    the lever: preset, fitness (`tmpq run`'s default kind unless --fitness says otherwise), budget, and the timestep
    grouping `grouping`, whose first timesteps are also the bits-only search's fixed schedule. The reference preset
    keeps its own rule, the quad grouping. Every search uses the super-network of `quant` (range-only or
    reconstructed), the one OUT/shared holds."""
    fit = FitnessConfig(fitness, fitness_samples, seed=seed)
    tmpq_evo = EvolutionConfig.tmpq(seed=seed, generations=generations)
    w6 = SearchConfig(
        budget=Budget.like("W6A6", 10),
        steps=(10,),
        grouping=grouping,
        lever="joint",
        quant=quant,
        evolution=tmpq_evo,
        fitness=fit,
        final_samples=0,  # this script re-scores every row itself
    )
    ref = replace(
        w6,
        grouping="quad",
        evolution=EvolutionConfig.reference(seed=seed, generations=ref_generations),
        fitness=FitnessConfig("fid", ref_fitness_samples, seed=seed),
    )
    g = f"{grouping} groups"
    rows = [
        Row("fp100", "FP, 100 steps (uniform)", "fp", 100, "uniform"),
        Row("fp10_uniform", "FP, 10 steps (uniform)", "fp", 10, "uniform"),
        Row("fp10_quad", "FP, 10 steps (quad)", "fp", 10, "quad"),
        Row("ptq_w6a6", "uniform PTQ W6A6 (quad)", "ptq", precision=(6, 6)),
        Row(f"ptq_w6a6_{grouping}", f"uniform PTQ W6A6 ({grouping})", "ptq", schedule=grouping, precision=(6, 6)),
        Row(f"joint_tmpq_w6a6_{grouping}", f"joint search, tmpq preset, W6A6 budget ({g})", "search", search=w6),
        Row(
            f"timesteps_w6a6_{grouping}",
            f"timesteps-only search, W6A6 fixed ({g})",
            "search",
            search=replace(w6, lever="timesteps"),
        ),
        Row(
            f"bits_w6a6_{grouping}",
            f"bits-only search, {grouping} schedule fixed, W6A6 budget",
            "search",
            search=replace(w6, lever="bits"),
        ),
        Row(
            "joint_ref_w6a6",
            "joint search, reference preset (reduced), W6A6 budget (quad groups)",
            "search",
            search=ref,
        ),
        Row("ptq_w8a8", "uniform PTQ W8A8 (quad)", "ptq", precision=(8, 8)),
        Row("ptq_w4a8", "uniform PTQ W4A8 (quad)", "ptq", precision=(4, 8)),
        Row(
            f"joint_tmpq_{tight.lower()}_{grouping}",
            f"joint search, tmpq preset, {tight.upper()} budget ({g})",
            "search",
            search=replace(w6, budget=Budget.like(tight, 10)),
        ),
    ]
    return [r for r in rows if r.name != "ptq_w6a6_quad"]  # with quad groups that row is ptq_w6a6


def score(images: torch.Tensor, metric: QualityMetric, seed: int) -> dict:
    """FID/IS of all samples, and FID of each disjoint half: the spread between the halves is the error bar."""
    s = metric.score(images, seed=seed)
    h = images.shape[0] // 2
    halves = [metric.fid(images[:h]), metric.fid(images[h:])]
    return {
        "fid": s.fid,
        "inception_score": s.inception_score,
        "inception_score_std": s.inception_score_std,
        "fid_halves": halves,
        "fid_half_spread": abs(halves[0] - halves[1]),
    }


@torch.no_grad()
def time_per_image(sample, n: int) -> float:
    """Milliseconds per image of `sample(n)` (batch 64), after a one-batch warm-up."""
    sample(min(n, 8))
    t0 = time.perf_counter()
    sample(n)
    return (time.perf_counter() - t0) * 1000 / n


def reused_fp_row(fp_rows: Path, row: Row, n: int, seed: int, weights_sha: str | None) -> dict | None:
    """A bench/baseline.py row (same EvalConfig, same weights) for this FP row, or None."""
    path = fp_rows / f"{row.schedule}_{row.steps}_{n}_{seed}.json"
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    want = json.loads(json.dumps(asdict(EvalConfig(steps=row.steps, schedule=row.schedule, num_samples=n, seed=seed))))
    defaults = json.loads(json.dumps(asdict(EvalConfig())))
    named = want["model"] if weights_sha is not None else old["config"].get("model")  # the model is its weights
    same_cfg = {**defaults, **old["config"], "model": named} == want
    if not same_cfg or old["provenance"].get("inputs_sha256", {}).get("model") != weights_sha:
        return None
    return {"fid": old["fid"], "inception_score": old["inception_score"], "source": str(path)}


def seed_run_dir(shared: Path, run_dir: Path) -> None:
    """Copy OUT/shared's prepared files into a search directory that lacks them."""
    share_prepared(shared, run_dir)


def keep_shared(shared: Path, run_dir: Path) -> None:
    """Keep what a search made once (sensitivity, proxy reference) for the next searches."""
    for name in ("sensitivity.json", "proxy_reference.safetensors"):
        if (run_dir / name).is_file() and not (shared / name).exists():
            shutil.copy2(run_dir / name, shared / name)


def fp_sampler(row: Row, ctx: dict, seed: int):
    """sample(k, progress) of the FP model on the row's schedule (a fresh, unwrapped copy of the model)."""
    loaded = ctx["loaded"]
    fp = load_model(loaded.spec)
    ddim = DDIMSampler(loaded.schedule, make_timesteps(row.schedule, row.steps, loaded.schedule.num_train_timesteps))

    def sample(k: int, progress: bool = False) -> torch.Tensor:
        return generate(fp.denoiser, ddim, k, loaded.sample_shape, seed, 100, progress=progress)

    return sample


def quantized_sampler(row: Row, ctx: dict) -> CompressedSampler:
    """The row's compressed sampler: a uniform setting on the shared super-network, or a finished search's best."""
    loaded, sn = ctx["loaded"], ctx["sn"]
    if row.kind == "ptq":
        ts = make_timesteps(row.schedule, row.steps, loaded.schedule.num_train_timesteps)
        return CompressedSampler(sn, loaded.schedule, ts, [sn.uniform_config(*row.precision)], (), loaded.sample_shape)
    return CompressionResult.open(ctx["out"] / "runs" / row.name).sampler("search")


def timing(row: Row, ctx: dict, seed: int, time_n: int, sampler: CompressedSampler | None = None) -> dict:
    """Measured sampling time per image: FP rows in PyTorch fp32, quantized rows on tmpq.runtime's int8 backend."""
    info = {"time_threads": torch.get_num_threads(), "time_images": time_n}
    if row.kind == "fp":
        return info | {"ms_per_image": time_per_image(fp_sampler(row, ctx, seed), time_n), "time_backend": "fp32"}
    from tmpq.runtime import Backend, lower

    sampler = sampler or quantized_sampler(row, ctx)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rt = lower(sampler, Backend("int8"))
    ms = time_per_image(lambda k: rt.sample(k, seed, batch_size=64), time_n)
    sampler.supernet.set_fp()
    return info | {
        "ms_per_image": ms,
        "time_backend": "int8",
        "runtime_mac_share": rt.summary()["mac_share"],
        "runtime_warnings": sorted({str(w.message)[:200] for w in caught}),
    }


def compute_row(row: Row, ctx: dict, n: int, seed: int, time_n: int) -> dict:
    """Sample the row's n images, score them, measure cost and speed; returns the row's result fields."""
    metric, sn = ctx["metric"], ctx["sn"]
    res: dict = {"search": None}
    if row.kind == "fp":
        ts = make_timesteps(row.schedule, row.steps, ctx["loaded"].schedule.num_train_timesteps)
        res |= {"timesteps": ts, "bitops": sn.cost.bitops(None, row.steps), "size_bits": sn.cost.size_bits(None)}
        res |= timing(row, ctx, seed, time_n)
        reused = reused_fp_row(ctx["fp_rows"], row, n, seed, ctx["weights_sha"])
        if reused is not None:
            return res | reused | {"fid_halves": None, "fid_half_spread": None, "sample_wall_s": None}
        t0 = time.perf_counter()
        images = fp_sampler(row, ctx, seed)(n, progress=True)
        wall = {"sample_wall_s": round(time.perf_counter() - t0, 1), "source": "computed"}
        return res | wall | score(images, metric, seed)
    if row.kind == "search":
        run_dir = ctx["out"] / "runs" / row.name
        seed_run_dir(ctx["shared"], run_dir)
        run_search(load_model(ctx["loaded"].spec), row.search, run_dir, execution=ctx["execution"])
        keep_shared(ctx["shared"], run_dir)
        summary = RunSummary.read(run_dir)
        res["search"] = summary.search_cost.to_dict() | {"best_fitness": summary.best.value, "run_dir": str(run_dir)}
    sampler = quantized_sampler(row, ctx)
    t0 = time.perf_counter()
    images = sampler.sample(n, seed, batch_size=100, progress=True)
    res |= {"sample_wall_s": round(time.perf_counter() - t0, 1), "source": "computed"} | score(images, metric, seed)
    res |= {
        "timesteps": list(sampler.timesteps),
        "bitops": sampler.bitops(),
        "size_bits": sampler.size_bits(),
        "bits": [list(map(list, c.bits)) for c in sampler.phase_configs],
    }
    return res | timing(row, ctx, seed, time_n, sampler)


def proxy_check(ctx: dict, spec: list[Row], names: list[str], seed: int, fitness_samples: int, fresh: int) -> list:
    """Why a search's best can lose to its own seed: the proxy (mean squared feature distance to FP-100 samples
    from the same noise) of each named search's best and of the uniform W6A6 rows, on the search's own fitness
    seeds and on `fresh` unseen ones (from seed 10,000), as mean and median over samples."""
    loaded, metric = ctx["loaded"], ctx["metric"]
    by_name = {r.name: r for r in spec}
    named = [n for n in names if by_name.get(n) and by_name[n].kind == "search"]
    named += [r.name for r in spec if r.kind == "ptq" and r.precision == (6, 6)]
    fp = load_model(loaded.spec)
    ddim = DDIMSampler(loaded.schedule, make_timesteps("uniform", 100, loaded.schedule.num_train_timesteps))
    out = []
    for s0, n in ((seed, fitness_samples), (10_000 + seed, fresh)):
        ref = metric.features(generate(fp.denoiser, ddim, n, loaded.sample_shape, s0, 128, progress=False))
        for name in named:
            sampler = quantized_sampler(by_name[name], ctx)
            d = (metric.features(sampler.sample(n, s0, batch_size=128)) - ref).pow(2).sum(dim=1)
            sampler.supernet.set_fp()
            row = {"row": name, "seeds": [s0, s0 + n - 1], "mean": float(d.mean()), "median": float(d.median())}
            out.append(row)
            typer.echo(f"    proxy {name}, seeds {s0}-{s0 + n - 1}: mean {row['mean']:.1f}, median {row['median']:.1f}")
    return out


def row_config(row: Row, n: int, seed: int, model: str, weights_sha: str | None, quant: QuantSpec) -> dict:
    d = {"name": row.name, "kind": row.kind, "steps": row.steps, "schedule": row.schedule}
    d |= {"quant": None if row.kind == "fp" else quant.to_dict()}
    d |= {"precision": row.precision, "search": None if row.search is None else row.search.to_dict()}
    return json.loads(json.dumps(d | {"num_samples": n, "seed": seed, "model": model, "model_sha256": weights_sha}))


def fmt_cost(s: dict | None) -> str:
    if not s:
        return "—"
    return f"{s['fitness_forwards']:,} ({s['evaluations']} cand.), {s['search_wall_s']:.0f} s"


def table(rows: list[dict], fp100_bitops: int, n: int) -> str:
    lines = [
        f"| row | steps | FID ↓ ({n:,}) | FID halves | IS ↑ | GBitOPs | × fewer than FP-100 | size (MB) "
        "| search cost: image-forwards, wall | ms / image (backend) |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|:---|---:|",
    ]
    for r in rows:
        halves = "—" if r["fid_halves"] is None else " / ".join(f"{h:.1f}" for h in r["fid_halves"])
        mark = "" if r["source"] == "computed" else "\\*"
        fid = f"{r['fid']:.2f}{mark}"
        lines.append(
            f"| {r['label']} | {len(r['timesteps'])} | {fid} | {halves} | {r['inception_score']:.3f} "
            f"| {r['bitops'] / 1e9:.2f} | {fp100_bitops / r['bitops']:.1f} | {r['size_bits'] / 8e6:.3f} "
            f"| {fmt_cost(r['search'])} | {r['ms_per_image']:.1f} ({r['time_backend'].split()[0]}) |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in rows:
        x, y = r["bitops"] / 1e9, r["fid"]
        err = None if r["fid_half_spread"] is None else r["fid_half_spread"] / 2
        marker = {"fp": "s", "ptq": "^", "search": "o"}[r["config"]["kind"]]
        ax.errorbar([x], [y], yerr=None if err is None else [[err], [err]], fmt=marker, capsize=3, label=r["label"])
    ax.set_xscale("log")
    ax.set_xlabel("GBitOPs per generated image (log)")
    ax.set_ylabel(f"FID ↓ ({rows[0]['config']['num_samples']:,} samples, classifier features)")
    ax.set_title("tmpq peers on the built-in model (error bars: half the FID spread of two disjoint halves)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    out: Path = Path("runs/peers"),
    num_samples: Annotated[int, typer.Option(help="final samples per row (seeds SEED..SEED+N-1)")] = 5000,
    seed: int = 0,
    fitness: Annotated[str, typer.Option(help="fitness of the tmpq-preset searches: fid | proxy")] = (
        FitnessConfig.kind
    ),
    fitness_samples: Annotated[int, typer.Option(help="fitness samples of the tmpq-preset searches")] = (
        FitnessConfig.num_samples
    ),
    generations: Annotated[int, typer.Option(help="generations of the tmpq-preset searches")] = 10,
    ref_fitness_samples: Annotated[int, typer.Option(help="FID fitness samples of the reference preset")] = 128,
    ref_generations: Annotated[int, typer.Option(help="generations of the reference preset")] = 2,
    grouping: Annotated[str, typer.Option(help="timestep grouping of the tmpq-engine searches")] = "uniform",
    tight: Annotated[
        str, typer.Option(help="the tighter budget of the last row (like uniform WxAy at 10 steps)")
    ] = "W4A6",
    workers: Annotated[int, typer.Option(help="search worker processes (1 thread each); 0: in-process")] = 2,
    time_samples: Annotated[int, typer.Option(help="images sampled to time each row")] = 128,
    fp_rows: Annotated[Path, typer.Option(help="bench/baseline.py rows to reuse for FP rows")] = Path(
        "runs/baseline/rows"
    ),
    retime: Annotated[bool, typer.Option(help="re-measure every row's sampling time in one pass at the end")] = False,
    proxy_check_rows: Annotated[
        str, typer.Option("--proxy-check", help="comma-separated search rows: proxy mean/median vs the W6A6 seeds")
    ] = "",
    only: Annotated[str, typer.Option(help="comma-separated row names (default: all)")] = "",
    reconstruction: Annotated[
        str, typer.Option(help="super-network of every quantized row: none | adaround | brecq")
    ] = "none",
    recon_preset: Annotated[str, typer.Option(help="reconstruction cost preset: demo | paper")] = "demo",
    model: str = "builtin:fashion",
) -> None:
    if grouping not in ("uniform", "quad"):
        raise typer.BadParameter("--grouping: uniform or quad (its first timesteps are a PTQ row's schedule)")
    args = {k: str(v) if isinstance(v, Path) else v for k, v in locals().items()}
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model)
    weights_sha = file_sha256(loaded.weights_path) if loaded.weights_path else None
    quant = QuantSpec().with_reconstruction(None if reconstruction == "none" else reconstruction, recon_preset)
    sn, _, _ = prepare_supernet(loaded, out / "shared", CalibConfig(), quant)
    ctx = {
        "out": out,
        "shared": out / "shared",
        "loaded": loaded,
        "sn": sn,
        "metric": reference_metric("fashion-mnist"),
        "fp_rows": fp_rows,
        "weights_sha": weights_sha,
        "execution": Execution(workers=workers, threads=1) if workers else Execution(),
    }
    spec = rows_spec(
        fitness, fitness_samples, generations, ref_fitness_samples, ref_generations, tight, seed, grouping, quant
    )
    wanted = {s for s in only.split(",") if s}
    results = []
    for i, row in enumerate(r for r in spec if not wanted or r.name in wanted):
        path = out / "rows" / f"{row.name}.json"
        cfg = row_config(row, num_samples, seed, model, weights_sha, quant)
        if path.is_file() and json.loads(path.read_text())["config"] == cfg:
            results.append(json.loads(path.read_text()))
            typer.echo(f"[{i + 1}/{len(spec)}] {row.name}: reused", err=True)
            continue
        typer.echo(f"[{i + 1}/{len(spec)}] {row.name} ({time.time() - start:.0f} s so far)", err=True)
        t0 = time.perf_counter()
        res = compute_row(row, ctx, num_samples, seed, time_samples)
        res = {
            "name": row.name,
            "label": row.label,
            "config": cfg,
            **res,
            "row_wall_s": round(time.perf_counter() - t0, 1),
        }
        write_json_atomic(path, res)
        results.append(res)
        typer.echo(f"    FID {res['fid']:.2f}  IS {res['inception_score']:.3f}  ({res['row_wall_s']:.0f} s)", err=True)
    if retime:  # one pass, one process, one thread setting: the time column compares like with like
        by_name = {r.name: r for r in spec}
        for res in results:
            res |= timing(by_name[res["name"]], ctx, seed, time_samples)
            write_json_atomic(out / "rows" / f"{res['name']}.json", res)
            typer.echo(f"    {res['name']}: {res['ms_per_image']:.1f} ms / image ({res['time_backend']})", err=True)
    if proxy_check_rows:
        checks = proxy_check(ctx, spec, proxy_check_rows.split(","), seed, fitness_samples, 256)
        write_json_atomic(out / "proxy_check.json", {"config": args, "rows": checks})
    fp100 = sn.cost.bitops(None, 100)
    results.sort(key=lambda r: -r["bitops"])
    md = table(results, fp100, num_samples)
    write_json_atomic(
        out / "peers.json",
        {
            "config": args,
            "rows": results,
            "fp100_bitops": fp100,
            "wall_s_this_call": round(time.time() - start, 1),
            "provenance": provenance({"model": loaded.weights_path} if loaded.weights_path else {}),
        },
    )
    note = (
        f"\n\n{num_samples:,} samples per row, seeds {seed}–{seed + num_samples - 1}; quantized rows on the "
        f"{'range-only' if reconstruction == 'none' else reconstruction + ' (' + recon_preset + ')'} super-network; "
        "FID/IS in the shipped "
        "classifier's feature space against the 60,000 training images. FID halves: the FID of samples "
        f"{seed}–{seed + num_samples // 2 - 1} and of the rest (each biased upward against the full-sample FID). "
        "\\* not sampled by this run: reused from bench/baseline.py's rows (same EvalConfig, same weights' SHA-256). "
        "Sampling time: "
        f"{time_samples} images in batches of 64 after a warm-up, torch threads "
        f"{sorted({r.get('time_threads') for r in results}, key=str)}; FP rows in PyTorch fp32, quantized rows on "
        "tmpq.runtime's int8 backend.\n"
    )
    (out / "peers.md").write_text(md + note)
    plot(results, out / "peers.png")
    typer.echo(md + note)
    typer.echo(f"this call: {time.time() - start:.0f} s", err=True)


if __name__ == "__main__":
    from tmpq.allocator import keep_freed_memory

    keep_freed_memory()  # as the tmpq command line does (docs/usage.md#speed-on-the-cpu)
    typer.run(main)
