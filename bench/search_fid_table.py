"""The Markdown table of every bench/search_fid.py run under a folder: what each option changed, its best's
5,000-sample FID/IS (and halves), BitOPs, schedule, best search fitness and search cost; the FID-selected pick
where `--select-top` was run.

    .venv/bin/python bench/search_fid_table.py runs/search_fid
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

REFERENCE = {
    "grouping": "uniform",
    "steps": [10],
    "phase_bounds": [],
    "lever": "joint",
    "seed_from": [],
    "fitness": {"kind": "proxy", "num_samples": 64, "reference_steps": 100, "proxy_stat": "mean"},
}
"""The reference setting (bench/peers.py's joint row); each run is described by how it differs from it."""


def describe(search: dict) -> str:
    """What a run's search config changes against the reference setting."""
    out = []
    for key in ("lever", "grouping", "steps", "phase_bounds"):
        if search.get(key) != REFERENCE[key]:
            out.append(f"{key} {search.get(key)}")
    fit = search["fitness"]
    if fit["kind"] != "proxy":
        out.append(f"fitness {fit['kind'].upper()} on {fit['num_samples']} samples")
    else:
        out += [f"{k} {fit.get(k)}" for k, ref in REFERENCE["fitness"].items() if fit.get(k) != ref]
    if search.get("seed_from"):
        out.append("seeded from " + ", ".join(Path(p).name for p in search["seed_from"]))
    return "; ".join(out) or "reference setting"


def main(folder: Path = typer.Argument(Path("runs/search_fid"))) -> None:
    typer.echo(
        "| run | option(s) | FID ↓ | IS ↑ | halves | GBitOPs | schedule | best fitness | evaluations | search s |\n"
        "|---|---|---:|---:|---|---:|---|---:|---:|---:|"
    )
    for path in sorted(folder.glob("*/fid5000.json")):
        r = json.loads(path.read_text())
        c = r["search_cost"]
        halves = " / ".join(f"{h:.1f}" for h in r["halves"])
        typer.echo(
            f"| {path.parent.name} | {describe(r['config']['search'])} | {r['fid']:.2f} | {r['is']:.3f} | {halves} | "
            f"{r['gbitops']:.2f} | `{r['timesteps']}` | {r['best_proxy']:.1f} | {c['evaluations']} | "
            f"{c['search_wall_s']:.0f} |"
        )
    for path in sorted(folder.glob("*/select.json")):
        s = json.loads(path.read_text())
        rows = ", ".join(f"#{r['rank']} {r['fid_select']:.1f}" for r in s["rows"])
        typer.echo(
            f"\n{path.parent.name}: FID on {s['config']['samples']} held-out seeds of the top {s['config']['top']}: "
            f"{rows}; pick #{s['pick']}: FID {s['final']['fid']:.2f} on the final seeds "
            f"(+{s['select_cost_forwards']:,} image-forwards)"
        )


if __name__ == "__main__":
    typer.run(main)
