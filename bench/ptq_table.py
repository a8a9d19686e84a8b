"""One Markdown table of uniform PTQ by calibration method: the bench/ptq.py runs of each method side by side.

Each folder is one `bench/ptq.py --out` (one reconstruction method; every schedule it was run on). Rows: precision
and schedule; columns: FP at the same steps (from whichever folder has it), then each method's FID with its change
against FP. A second table gives each method's calibration cost as the run recorded it.

    .venv/bin/python bench/ptq_table.py runs/ptq_v2_range runs/ptq_v2_range_bc runs/ptq_v2_adaround runs/ptq_v2_brecq
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

NAMES = {None: "range-only", "adaround": "AdaRound", "brecq": "BRECQ"}


def _method(folder: Path) -> str:
    """The calibration a folder's super-network had: its method, and the rounding it started from."""
    detail = json.loads((folder / "calibration.json").read_text())["supernet_detail"]
    recon = detail.get("reconstruction")
    name = NAMES.get(None if recon is None else recon["method"], str(recon))
    start = "bias-corrected" if "bias_correction" in detail else "nearest"
    return f"{name}, {start} rounding" if recon is None else f"{name} (from {start} rounding)"


def _rows(folder: Path, steps: int, samples: int, seed: int) -> dict[tuple[str, str], dict]:
    out = {}
    for path in folder.glob(f"rows/*_*{steps}_{samples}_{seed}.json"):
        r = json.loads(path.read_text())
        if r["config"]["steps"] == steps and r["config"]["num_samples"] == samples and r["config"]["seed"] == seed:
            out[(r["label"], r["config"]["schedule"])] = r
    return out


def _fid(r: dict | None, fp: dict | None) -> str:
    if r is None:
        return "—"
    if fp is None:
        return f"{r['fid']:.2f}"
    return f"{r['fid']:.2f} ({(r['fid'] / fp['fid'] - 1) * 100:+.0f} %)"


def _to_fp(r: dict | None) -> str:
    f = None if r is None else r.get("fidelity")
    return "—" if not f else f"{f['fid']:.2f} / {f['psnr_db']:.1f} dB"


def main(
    folders: list[Path] = typer.Argument(..., help="bench/ptq.py --out folders, one per calibration method"),
    steps: int = 10,
    num_samples: int = 5000,
    seed: int = 0,
    configs: str = "W8A8,W6A6,W5A5,W4A8,W4A6",
) -> None:
    methods = {_method(f): _rows(f, steps, num_samples, seed) for f in folders}
    fp = {s: r for rows in methods.values() for (label, s), r in rows.items() if label == "FP"}
    schedules = sorted({s for rows in methods.values() for _, s in rows}, key=lambda s: (s != "uniform", s))
    head = "| precision | schedule | FP |" + "".join(f" {m} |" for m in methods)
    typer.echo(head + "\n|---|---|---:|" + "---:|" * len(methods))
    for s in schedules:
        for label in configs.split(","):
            cells = "".join(f" {_fid(rows.get((label, s)), fp.get(s))} |" for rows in methods.values())
            fp_cell = f"{fp[s]['fid']:.2f}" if s in fp else "—"
            typer.echo(f"| {label} | {s} | {fp_cell} |{cells}")
    typer.echo(
        f"\nFID in the shipped classifier's feature space, {num_samples} samples per cell (seeds {seed}–"
        f"{seed + num_samples - 1}), {steps} DDIM steps; in brackets the change against FP on the same schedule."
    )
    if any(r.get("fidelity") for rows in methods.values() for r in rows.values()):
        typer.echo("\n| precision | schedule |" + "".join(f" {m}: FID to FP / PSNR to FP |" for m in methods))
        typer.echo("|---|---|" + "---:|" * len(methods))
        for s in schedules:
            for label in configs.split(","):
                cells = "".join(f" {_to_fp(rows.get((label, s)))} |" for rows in methods.values())
                typer.echo(f"| {label} | {s} |{cells}")
        typer.echo(
            "\nFID to FP (the FP model's samples from the same seeds as the reference, not the real data) and mean "
            "PSNR to FP per image: how far each calibration moved the sampler, whatever FID against the data reads "
            "into it; — where a row was made before fidelity was recorded."
        )
    typer.echo(
        "\n| method | super-network calibration s | of it reconstruction s | peak RSS MB |\n|---|---:|---:|---:|"
    )
    for f in folders:
        cal = json.loads((f / "calibration.json").read_text())
        recon = cal["supernet_detail"].get("reconstruction")
        typer.echo(
            f"| {_method(f)} | {cal['supernet_calibrate_s']} | {recon['seconds'] if recon else '—'} | "
            f"{cal['peak_rss_mb']} |"
        )


if __name__ == "__main__":
    typer.run(main)
