"""The report of a run: the peers table and the pictures people would rather look at than read.

`write_report(run_dir)` reads only files the run wrote (search.json, search_state.json, the saved
super-network's costs, the final sample grids) and writes RUN/report/{report.html, report.md, *.png}.
Other runs (e.g. single-lever searches of the same model) can be added as labelled peers.
"""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from tmpq.errors import TmpqError  # noqa: E402
from tmpq.search.evolution import Record  # noqa: E402
from tmpq.search.summary import FinalRow, RunSummary  # noqa: E402

REPORT_DIR = "report"


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise TmpqError(f"{path} is missing: {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TmpqError(f"{path} is not valid JSON ({e}); re-run the step that writes it") from None


class RunData:
    """What one run directory holds, read once: its summary, every evaluated record, the super-network's units."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.search = RunSummary.read(self.dir, "run `tmpq search` first")
        state_path = self.dir / "search_state.json"
        records = _read_json(state_path, "the search state is gone").get("records", {}).values()
        self.records = [Record.from_json(r) for r in records]
        sn = self.dir / "supernet" / "supernet.json"
        self.supernet = _read_json(sn, "the calibrated super-network is gone") if sn.is_file() else None
        self.final = self.search.final
        self.schedule = self.search.noise_schedule
        self.fitness_label = self.search.fitness_label

    def best_final(self) -> FinalRow | None:
        return self.final.best if self.final else None


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- figures ------------------------------------------------------------------------------------------------
def _pareto_plot(run: RunData, peers: Mapping[str, RunData], path: Path) -> Path:
    s = run.search
    fig, axes = plt.subplots(1, 2 if run.final else 1, figsize=(12 if run.final else 6.5, 4.5), squeeze=False)
    ax = axes[0][0]
    xs = [r.bitops / 1e9 for r in run.records]
    ys = [r.value for r in run.records]
    ax.scatter(xs, ys, s=10, alpha=0.45, color="tab:blue", label=f"evaluated ({len(xs)})")
    front = sorted(s.pareto, key=lambda r: r.bitops)
    ax.plot([r.bitops / 1e9 for r in front], [r.value for r in front], "-o", ms=4, color="tab:red", label="front")
    ax.axvline(s.budget_bitops / 1e9, ls="--", color="gray", lw=1, label="budget")
    b = s.best
    ax.scatter([b.bitops / 1e9], [b.value], marker="*", s=160, color="gold", edgecolor="k", zorder=5, label="best")
    ax.set_xlabel("GBitOPs per image")
    ax.set_ylabel(f"search fitness ({run.fitness_label}), lower is better")
    ax.set_title("every candidate the search evaluated")
    ax.legend(fontsize=8)
    if run.final:
        ax = axes[0][1]
        rows = list(run.final.rows)
        for label, peer in peers.items():
            pb = peer.best_final()
            if pb:
                rows.append(replace(pb, label=label))
        for r in rows:
            color = "tab:green" if not r.quantized else "tab:purple" if r.label.startswith("baseline") else "tab:red"
            ax.scatter([r.bitops / 1e9], [r.fid], color=color, s=40, zorder=3)
            ax.annotate(r.label, (r.bitops / 1e9, r.fid), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.axvline(s.budget_bitops / 1e9, ls="--", color="gray", lw=1)
        span = max(r.bitops for r in rows) / max(min(r.bitops for r in rows), 1)
        if span > 10:  # FP at full steps is hundreds of times the budget: only then a log axis
            ax.set_xscale("log")
        ax.set_xlabel("GBitOPs per image" + (" (log)" if span > 10 else ""))
        ax.set_ylabel(f"FID @ {run.final.samples} samples, lower is better")
        ax.set_title("final re-scoring: peers and the search's best")
    return _save(fig, path)


def _bits_plot(run: RunData, path: Path) -> Path:
    configs = [qc.as_dict() for qc in run.search.quant_configs]
    names = sorted(configs[0])
    cols, labels = [], []
    for p, cfg in enumerate(configs):
        for j, what in enumerate(("W", "A")):
            cols.append([cfg[n][j] for n in names])
            labels.append(f"{what}" + (f" (phase {p})" if len(configs) > 1 else ""))
    import numpy as np

    kinds = {n: u["kind"] for n, u in (run.supernet or {}).get("units", {}).items()}
    grid = np.array([[np.nan if v is None else v for v in col] for col in cols], dtype=float).T
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(cols), 1.5 + 0.17 * len(names)))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=2, vmax=8)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            no_weight = kinds.get(names[i]) == "matmul" and labels[j].startswith("W")
            text = "–" if no_weight else "FP" if np.isnan(v) else f"{int(v)}"
            ax.text(j, i, text, ha="center", va="center", fontsize=6,
                    color="k" if np.isnan(v) or v > 5 else "w")  # fmt: skip
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_yticks(range(len(names)), [n.removeprefix("unet.") for n in names], fontsize=6)
    ax.set_title("bits per layer\n(grey FP; – matmul: no weight)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, label="bits")
    return _save(fig, path)


def _timesteps_plot(run: RunData, path: Path) -> Path:
    ts = run.search.best.candidate.timesteps
    sched = run.schedule
    T = sched.num_train_timesteps
    sigma = (1 - sched.alphas_cumprod).sqrt().numpy()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.plot(range(T), sigma, color="k", lw=1, label=r"noise level $\sqrt{1-\bar\alpha_t}$")
    rows = [("chosen", ts, "tab:red"), ("uniform", sched.timesteps("uniform", len(ts)), "tab:blue")]
    rows.append(("quadratic", sched.timesteps("quad", len(ts)), "tab:green"))
    for i, (label, steps, color) in enumerate(rows):
        y = -0.12 - 0.12 * i
        ax.scatter(steps, [y] * len(steps), color=color, s=22, label=f"{label} ({len(steps)} steps)", zorder=3)
        ax.scatter(steps, [float(sigma[t]) for t in steps], color=color, s=10, zorder=3)
    ax.set_xlim(-10, T + 10)
    ax.set_ylim(-0.5, 1.05)
    ax.set_xlabel("timestep t")
    ax.set_yticks([0, 0.5, 1.0])
    ax.legend(fontsize=8, loc="center right")
    ax.set_title("kept timesteps on the noise schedule")
    return _save(fig, path)


def _progress_plot(run: RunData, path: Path) -> Path:
    hist = run.search.history
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    by_gen: dict[int, list[float]] = {}
    for r in run.records:
        by_gen.setdefault(r.generation, []).append(r.value)
    for g, vals in sorted(by_gen.items()):
        ax.scatter([g] * len(vals), vals, s=8, alpha=0.35, color="tab:blue")
    ax.plot([h["generation"] for h in hist], [h["best_value"] for h in hist], "-o", color="tab:red", ms=4,
            label="best so far")  # fmt: skip
    ax.set_xlabel("generation")
    ax.set_ylabel(run.fitness_label)
    top = ax.secondary_xaxis("top")
    top.set_xticks([h["generation"] for h in hist][:: max(1, len(hist) // 5)])
    top.set_xticklabels([f"{h['forwards'] / 1e3:.0f}k" for h in hist][:: max(1, len(hist) // 5)], fontsize=7)
    top.set_xlabel("image-forwards spent", fontsize=8)
    ax.legend(fontsize=8)
    return _save(fig, path)


# --- tables -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeerRow:
    """One row of the peers table: a compared setting, its cost and quality, and what its search spent."""

    method: str
    steps: int
    bitops: int
    saving: float | None  # × fewer BitOPs than FP at 100 steps
    fid: float | None = None
    inception_score: float | None = None
    search_forwards: int | None = None
    fid_to_fp: float | None = None  # FID against FP-100's samples from the same seeds


def peers_rows(run: RunData, peers: Mapping[str, RunData]) -> list[PeerRow]:
    """One row per compared setting: FP full steps, step reduction, uniform PTQ, the search, other runs."""
    s = run.search
    spent = s.search_cost.fitness_forwards + s.search_cost.overhead_forwards

    def row(method: str, r: FinalRow, forwards: int | None) -> PeerRow:
        saving = s.fp_bitops_full_100 / r.bitops if r.bitops else None
        return PeerRow(method, len(r.timesteps), r.bitops, saving, r.fid, r.inception_score, forwards, r.fid_to_fp)

    rows = []
    if run.final:
        for r in run.final.rows:
            if r.label == "baseline":
                label = f"uniform PTQ ({s.budget})"
            elif r.label.startswith("baseline ("):  # PTQ on the schedule where FP scored best
                label = f"uniform PTQ ({s.budget}, {r.label.partition('(')[2].rstrip(')')})"
            elif r.label.startswith("top"):
                label = f"tmpq search, {r.label} ({s.lever})"
            else:
                label = r.label
            rows.append(row(label, r, spent if r.label.startswith("top") else None))
        for name, peer in peers.items():
            pb = peer.best_final()
            if pb:
                pc = peer.search.search_cost
                rows.append(row(name, pb, pc.fitness_forwards + pc.overhead_forwards))
    else:
        b = s.best
        saving = s.fp_bitops_full_100 / b.bitops if b.bitops else None
        rows.append(PeerRow("tmpq search, best", len(b.candidate.timesteps), b.bitops, saving, search_forwards=spent))
    return rows


def _table_md(rows: list[PeerRow], samples: int | None) -> str:
    head = (
        f"| setting | steps | GBitOPs / image | × fewer BitOPs than FP-100 | FID{f' @ {samples}' if samples else ''} ↓ "
    )
    head += "| FID to FP-100 ↓ | IS ↑ | search image-forwards |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    lines = [head]
    for r in rows:
        fid = "—" if r.fid is None else f"{r.fid:.2f}"
        to_fp = "—" if r.fid_to_fp is None else f"{r.fid_to_fp:.2f}"
        is_ = "—" if r.inception_score is None else f"{r.inception_score:.3f}"
        sf = "—" if not r.search_forwards else f"{r.search_forwards:,}"
        cost = f"{r.bitops / 1e9:.2f} | {r.saving:.1f}"
        lines.append(f"| {r.method} | {r.steps} | {cost} | {fid} | {to_fp} | {is_} | {sf} |")
    return "\n".join(lines)


def _table_html(rows: list[PeerRow], samples: int | None) -> str:
    return _md_table_html(_table_md(rows, samples).splitlines())


def _speed(run_dir: Path) -> list[str]:
    """The run's measured speed (RUN/speed.json, written by `tmpq run` / `tmpq speed`) as Markdown lines."""
    from tmpq.runtime.measure import SPEED_FILE, speed_lines

    path = run_dir / SPEED_FILE
    return speed_lines(_read_json(path, "re-measure with `tmpq speed`")) if path.is_file() else []


def _md_table_html(md: list[str]) -> str:
    head = [c.strip() for c in md[0].strip("|").split("|")]
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"]
    for line in md[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _throughput(history: Sequence[dict]) -> str:
    """Evaluations per minute and worker utilisation, averaged over the generations that evaluated something."""
    rows = [h for h in history if h.get("evals_per_min")]
    if not rows:
        return "throughput: not recorded (a run from before tmpq recorded it)"
    rate = sum(h["evals_per_min"] for h in rows) / len(rows)
    util = sum(h["utilisation"] for h in rows) / len(rows)
    return f"throughput: {rate:.1f} candidates/min on {rows[-1]['workers']} worker(s), utilisation {util:.0%}"


# --- the report ---------------------------------------------------------------------------------------------
def write_report(
    run_dir: str | Path, out_dir: str | Path | None = None, peers: Mapping[str, str | Path] | None = None
) -> tuple[Path, Path]:
    """Write report.html and report.md (+ figures) for a finished run; returns their paths."""
    run = RunData(run_dir)
    peer_runs = {label: RunData(p) for label, p in (peers or {}).items()}
    out = Path(out_dir) if out_dir is not None else run.dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    figs = {
        "pareto": _pareto_plot(run, peer_runs, out / "pareto.png"),
        "bits": _bits_plot(run, out / "bits.png"),
        "timesteps": _timesteps_plot(run, out / "timesteps.png"),
        "progress": _progress_plot(run, out / "progress.png"),
    }
    grids: list[tuple[str, str]] = []
    if run.final:
        wanted = [r for r in run.final.rows if not r.quantized and len(r.timesteps) >= 100]
        baseline, best = run.final.baseline, run.final.best
        wanted += [r for r in (baseline, best) if r is not None and r not in wanted]
        for r in wanted:
            src = run.dir / r.grid if r.grid else None
            if src and src.is_file():
                dst = out / f"grid_{src.name}"
                shutil.copyfile(src, dst)
                title = "compressed (best)" if r is best else "uniform PTQ" if r.label == "baseline" else r.label
                title = "compressed (best: uniform PTQ)" if r is best and r.label.startswith("baseline") else title
                grids.append((f"{title}: FID {r.fid:.2f}, {r.bitops / 1e9:.2f} GBitOPs", dst.name))
    rows = peers_rows(run, peer_runs)
    s = run.search
    samples = run.final.samples if run.final else None
    cost = s.search_cost
    b = s.best
    facts = [
        f"model: `{s.model}`; budget: {s.budget} = {s.budget_bitops / 1e9:.2f} GBitOPs per image",
        f"search: {cost.evaluations} candidates, {cost.fitness_forwards:,} image-forwards for fitness "
        f"(+{cost.overhead_forwards:,} calibration/sensitivity/reference), {cost.search_wall_s:.0f} s",
        f"fitness: {run.fitness_label}; chosen: {b.bitops / 1e9:.2f} GBitOPs, fitness {b.value:.4f}",
        _throughput(s.history),
        f"chosen timesteps: {list(b.candidate.timesteps)}",
    ]
    verdict = run.final.verdict() if run.final else None
    if verdict:
        facts.append(f"**verdict: {verdict}**")
    md = [
        "# tmpq report",
        "",
        *[f"- {f}" for f in facts],
        "",
        "## Peers",
        "",
        _table_md(rows, samples),
        "",
        "## Quality vs cost",
        "",
        "![Pareto](pareto.png)",
        "",
        "## Chosen bits per layer",
        "",
        "![bits](bits.png)",
        "",
        "## Chosen timesteps",
        "",
        "![timesteps](timesteps.png)",
        "",
        "## Search progress",
        "",
        "![progress](progress.png)",
        "",
    ]
    speed = _speed(run.dir)
    if speed:
        md += ["## Measured speed", "", *speed, ""]
    if grids:
        md += ["## Samples (same noise)", ""]
        md += [f"**{t}**\n\n![{t}]({f})\n" for t, f in grids]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))

    def fact_html(f: str) -> str:
        f = html.escape(f)
        while "`" in f:
            f = f.replace("`", "<code>", 1).replace("`", "</code>", 1)
        return f.replace("**", "")

    body = [
        "<h1>tmpq report</h1>",
        "<ul>" + "".join(f"<li>{fact_html(f)}</li>" for f in facts) + "</ul>",
        "<h2>Peers</h2>",
        _table_html(rows, samples),
        "<h2>Quality vs cost</h2>",
        f'<img src="{figs["pareto"].name}" alt="Pareto plot">',
        "<div class='cols'><div class='narrow'><h2>Chosen bits per layer</h2>",
        f'<img src="{figs["bits"].name}" alt="bits per layer"></div><div>',
        "<h2>Chosen timesteps</h2>",
        f'<img src="{figs["timesteps"].name}" alt="timesteps">',
        "<h2>Search progress</h2>",
        f'<img src="{figs["progress"].name}" alt="progress">',
    ]
    body.append("</div></div>")
    if speed:
        table = [ln for ln in speed if ln.startswith("|")]
        prose = [ln for ln in speed if ln and not ln.startswith("|")]
        body += ["<h2>Measured speed</h2>", f"<p>{fact_html(prose[0])}</p>", _md_table_html(table)]
        body += [f"<p>{fact_html(p)}</p>" for p in prose[1:]]
    if grids:
        body.append("<h2>Samples (same noise)</h2><div class='grids'>")
        body += [f"<figure><img src='{f}'><figcaption>{html.escape(t)}</figcaption></figure>" for t, f in grids]
        body.append("</div>")
    style = (
        "body{font-family:sans-serif;max-width:1250px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #bbb;padding:4px 8px}"
        "td:not(:first-child){text-align:right}img{max-width:100%}"
        ".grids{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0;flex:0 0 32%}figcaption{font-size:13px}"
        ".cols{display:flex;gap:24px;align-items:flex-start}.narrow{flex:0 0 34%}"
    )
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>tmpq report</title><style>{style}</style>"
    page += "</head><body>" + "\n".join(body) + "</body></html>"
    html_path = out / "report.html"
    html_path.write_text(page)
    return html_path, md_path
