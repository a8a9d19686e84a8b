"""What `tmpq run` ships under one flag combination, scored on 5,000 samples: the measurement behind its defaults.

Runs `tmpq run --model MODEL --run-dir OUT/<tag> --like W6A6 --budget-steps 10 --steps 10 <flags>` (a subprocess,
exactly as a user would, so the search, the final re-scoring against FP and uniform PTQ and the choice of what to
ship all happen), then scores the sampler the run exported (RUN/export) on --num-samples images from seeds 0…N-1,
with the FID of each half as the error bar. Every row shares one calibration (OUT/shared, copied into each run
before it starts), so rows differ only by their flags. Resumable: a finished run is resumed by `tmpq run` itself
(nothing recomputed) and a scored one is read back from RUN/fid5000.json when its config matches and the run
still ships the same sampler (a newer tmpq may add rows to the run's final table; they are copied in).

    OMP_NUM_THREADS=1 .venv/bin/python bench/run_flags.py --flags ""                   # the defaults
    OMP_NUM_THREADS=1 .venv/bin/python bench/run_flags.py --flags "--grouping quad"
    OMP_NUM_THREADS=1 .venv/bin/python bench/run_flags.py --flags "--staged" --execution "--workers 2"
    .venv/bin/python bench/run_flags.py --table                                         # the Markdown table
    .venv/bin/python bench/run_flags.py --final                        # each run's final table, a column per run
    OMP_NUM_THREADS=1 .venv/bin/python bench/run_flags.py --model bench/assets/heldout_pipeline \
        --out runs/run_flags_heldout --num-samples 2000

One OUT per model: its rows share OUT/shared.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import typer

from tmpq.allocator import keep_freed_memory
from tmpq.api import CompressionResult
from tmpq.evaluate import reference_metric
from tmpq.provenance import provenance
from tmpq.search.run import share_prepared

BASE = ["--like", "W6A6", "--budget-steps", "10", "--steps", "10"]


def tag_of(flags: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", flags).strip("_") or "defaults"


def main(
    flags: str = typer.Option("", help="the flags under test, as one string"),
    execution: str = typer.Option("", help="flags that never change the result (e.g. '--workers 2'): not in the tag"),
    model: str = "builtin:fashion",
    num_samples: int = 5000,
    out: Path = Path("runs/run_flags"),
    table: bool = typer.Option(False, help="print the table of every scored row under OUT and stop"),
    final: bool = typer.Option(False, help="print each scored run's own final table (FP, PTQ, top rows) and stop"),
) -> None:
    if table:
        return _table(out)
    if final:
        return _final_table(out)
    keep_freed_memory()  # as `tmpq run` does; scoring 5,000 samples is 1.5x faster with it
    run = out / tag_of(flags)
    share_prepared(out / "shared", run)  # one calibration for every row of OUT (each file is checked on reuse)
    cmd = [
        sys.executable,
        "-m",
        "tmpq",
        "run",
        "--model",
        model,
        "--run-dir",
        str(run),
        *BASE,
        *shlex.split(flags),
        *shlex.split(execution),
    ]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t0
    share_prepared(run, out / "shared")  # what the shared folder still lacks (e.g. the FP rows of the final table)
    config = {"model": model, "flags": flags, "base": BASE, "num_samples": num_samples, "seeds": [0, num_samples - 1]}
    path = run / "fid5000.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    summary = json.loads((run / "search.json").read_text())
    exported = json.loads((run / "export" / "tmpq_compressed.json").read_text())
    if res.get("config") == config and res.get("shipped") == exported["info"]["label"]:
        # the same sampler is shipped: its score stands, the run's own final table may have grown rows
        res |= _final_rows(summary)
        path.write_text(json.dumps(res, indent=1))
    else:
        result = CompressionResult.open(run)
        s = result.sampler("best")
        images = s.sample(num_samples, seed=0, batch_size=100)
        metric = reference_metric("fashion-mnist")
        half = num_samples // 2
        res = {
            "fid": metric.fid(images),
            "halves": [metric.fid(images[:half]), metric.fid(images[half:])],
            "shipped": exported["info"]["label"],  # 'baseline' (uniform PTQ) or the search's 'top1', 'top2', ...
            "timesteps": list(s.timesteps),
            "gbitops": s.bitops() / 1e9,
            "search_cost": summary["search_cost"],
            "run_wall_s": wall,
            "config": config,
            "provenance": provenance(),
        } | _final_rows(summary)
        path.write_text(json.dumps(res, indent=1))
    typer.echo(json.dumps({k: v for k, v in res.items() if k not in ("config", "provenance")}))


def _final_rows(summary: dict) -> dict:
    """The run's own final table: FID and FID to FP-100 per row (None without a final table)."""
    rows = summary["final"]["rows"] if summary.get("final") else None
    return {
        "final": {r["label"]: r["fid"] for r in rows} if rows else None,
        "final_to_fp": {r["label"]: r.get("fid_to_fp") for r in rows} if rows else None,
    }


def _final_table(out: Path) -> None:
    """Each scored run's own final table (its --final-samples, same seeds), one column per run."""
    runs = {}
    for path in sorted(out.glob("*/fid5000.json")):
        r = json.loads(path.read_text())
        runs[r["config"]["flags"] or "(defaults)"] = (r.get("final") or {}, r.get("final_to_fp") or {})
    labels = list(dict.fromkeys(label for final, _ in runs.values() for label in final))
    typer.echo("FID / FID to FP-100 (— where not measured)")
    typer.echo("| row | " + " | ".join(f"`{f}`" for f in runs) + " |")
    typer.echo("|---|" + "---:|" * len(runs))

    def cell(final: dict, to_fp: dict, label: str) -> str:
        if label not in final:
            return "—"
        return f"{final[label]:.2f}" + ("" if to_fp.get(label) is None else f" / {to_fp[label]:.2f}")

    for label in labels:
        typer.echo(f"| {label} | " + " | ".join(cell(*runs[f], label) for f in runs) + " |")


def _table(out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/fid5000.json"))]
    counts = sorted({r["config"]["num_samples"] for r in rows})
    n = ", ".join(f"{c:,}" for c in counts)
    typer.echo(f"| flags | shipped FID ({n}) | halves | shipped | schedule | search evaluations | search wall |")
    typer.echo("|---|---:|---|---|---|---:|---:|")
    for r in rows:
        flags = r["config"]["flags"] or "(defaults)"
        ts = ",".join(map(str, r["timesteps"]))
        halves = " / ".join(f"{h:.1f}" for h in r["halves"])
        ev = r["search_cost"].get("evaluations")
        wall = r["search_cost"].get("search_wall_s")  # the search's own wall, summed over resumed calls
        wall_s = f"{wall / 60:.0f} min" if wall else "—"
        typer.echo(f"| `{flags}` | {r['fid']:.2f} | {halves} | {r['shipped']} | {ts} | {ev} | {wall_s} |")


if __name__ == "__main__":
    typer.run(main)
