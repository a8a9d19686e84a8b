"""A finished search's summary (RUN/search.json) as typed objects: written by the search, read back by the API, the
CLI, the report, seeded searches and the bench scripts, so none of them reads the file by string keys.

The file's layout is unchanged from earlier versions (older run directories still open); keys a file of this format
may lack (added since format 1 began) take their defaults here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tmpq.errors import TmpqError
from tmpq.fileio import write_json_atomic
from tmpq.quant.config import QuantConfig
from tmpq.sampling.schedules import NoiseSchedule, schedule_from_dict
from tmpq.search.config import SearchConfig
from tmpq.search.evolution import Record
from tmpq.search.space import Candidate
from tmpq.serialization import FORMAT_VERSION, VERSION_KEY

SUMMARY_FILE = "search.json"


@dataclass(frozen=True)
class FinalRow:
    """One row of the final re-scoring: an FP peer (`candidate` None) or a quantized candidate, on the final seeds."""

    label: str
    kind: str  # "fp" | "quantized"
    candidate: Candidate | None
    timesteps: tuple[int, ...]
    fid: float
    bitops: int
    inception_score: float | None = None
    forwards: int = 0
    wall_s: float = 0.0
    grid: str | None = None  # a 64-image grid, relative to the run directory
    # FID against the FP model's samples at full steps from the same seeds (not the real data): how far this sampler
    # moved from the model it compresses; None for that FP row itself and for rows scored before it was recorded
    fid_to_fp: float | None = None

    @property
    def quantized(self) -> bool:
        return self.candidate is not None

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "kind": self.kind,
            "candidate": None if self.candidate is None else self.candidate.to_json(),
            "timesteps": list(self.timesteps),
            "fid": self.fid,
            "inception_score": self.inception_score,
            "bitops": self.bitops,
            "forwards": self.forwards,
            "wall_s": self.wall_s,
            "grid": self.grid,
            "fid_to_fp": self.fid_to_fp,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FinalRow:
        cand = d.get("candidate")
        return cls(
            label=d["label"],
            kind=d.get("kind", "fp" if cand is None else "quantized"),
            candidate=None if cand is None else Candidate.from_json(cand),
            timesteps=tuple(int(t) for t in d["timesteps"]),
            fid=float(d["fid"]),
            bitops=int(d["bitops"]),
            inception_score=d.get("inception_score"),
            forwards=int(d.get("forwards", 0)),
            wall_s=float(d.get("wall_s", 0.0)),
            grid=d.get("grid"),
            fid_to_fp=d.get("fid_to_fp"),
        )


@dataclass(frozen=True)
class FinalScores:
    """The final re-scoring: every row on `samples` images from the same seeds. `criterion` is what ranks the rows
    (and so what ships): "fid" (against the data) or "fid_to_fp" (against FP-100's samples), the one the search's
    fitness optimised."""

    samples: int
    rows: tuple[FinalRow, ...]
    criterion: str = "fid"

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise TmpqError(f"final criterion must be one of {tuple(CRITERIA)}, got {self.criterion!r}")

    @property
    def criterion_label(self) -> str:
        return CRITERIA[self.criterion]

    def value(self, row: FinalRow) -> float:
        """`row`'s score under the criterion (lower is better); FP-100 is its own reference under "fid_to_fp"."""
        if self.criterion == "fid":
            return row.fid
        return 0.0 if row.fid_to_fp is None and not row.quantized else _or_inf(row.fid_to_fp)

    @property
    def best(self) -> FinalRow | None:
        """The best quantized row by the criterion; it may be the uniform-precision baseline (then the search found
        nothing better, and the CLI and the report say so)."""
        quantized = [r for r in self.rows if r.quantized]
        return min(quantized, key=self.value) if quantized else None

    @property
    def baseline(self) -> FinalRow | None:
        return self.row("baseline")

    def row(self, label: str) -> FinalRow | None:
        return next((r for r in self.rows if r.label == label), None)

    def best_fp(self, steps: int) -> FinalRow | None:
        """The best FP row at `steps` steps over the rule-based schedules (the strongest plain step reduction)."""
        fp = [r for r in self.rows if not r.quantized and len(r.timesteps) == steps]
        return min(fp, key=self.value) if fp else None

    def verdict(self) -> str | None:
        """One plain sentence: did the search beat uniform PTQ at the budget, and how far is it from FP at the same
        step count on the best schedule? None without a quantized row."""
        best = self.best
        if best is None:
            return None
        name = self.criterion_label
        ptq = [r for r in self.rows if r.quantized and r.label.startswith("baseline")]
        base = min(ptq, key=self.value) if ptq else None
        if base is not None and best is base:
            where = "" if base.label == "baseline" else f" on the {base.label.partition('(')[2].rstrip(')')}"
            head = (
                f"uniform PTQ{where} ({name} {self.value(base):.2f}) scored best: the search found nothing better at "
                "this budget"
            )
        elif base is not None:
            head = (
                f"the search ({best.label}, {name} {self.value(best):.2f}) beat uniform PTQ at the budget "
                f"({name} {self.value(base):.2f})"
            )
        else:
            head = f"the best compressed sampler ({best.label}) scores {name} {self.value(best):.2f}"
        fp = self.best_fp(len(best.timesteps))
        if fp is None:
            return head
        gap = self.value(best) - self.value(fp)
        rel = f"{abs(gap):.2f} {'worse' if gap > 0 else 'better'}"
        return (
            f"{head}; against {fp.label} ({name} {self.value(fp):.2f}) it is {rel} at {fp.bitops / best.bitops:.0f}x "
            "fewer BitOPs"
        )

    def to_dict(self) -> dict:
        best, baseline = self.best, self.baseline
        return {
            "samples": self.samples,
            "criterion": self.criterion,
            "rows": [r.to_dict() for r in self.rows],
            "best": None if best is None else best.to_dict(),  # kept in the file for readers without tmpq
            "baseline": None if baseline is None else baseline.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FinalScores:
        rows = tuple(FinalRow.from_dict(r) for r in d["rows"])
        return cls(int(d["samples"]), rows, d.get("criterion", "fid"))


CRITERIA = {"fid": "FID", "fid_to_fp": "FID to FP-100"}
"""What a final table can rank by, with the name the CLI and the report print."""


def _or_inf(x: float | None) -> float:
    return float("inf") if x is None else x


@dataclass(frozen=True)
class SearchCost:
    """What the search spent: image-forwards by purpose, candidates evaluated, wall time."""

    fitness_forwards: int = 0
    overhead_forwards: int = 0  # calibration, sensitivity, proxy reference, grouping choice
    final_forwards: int = 0
    evaluations: int = 0
    search_wall_s: float = 0.0
    this_call_wall_s: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchCost:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SeedSearch:
    """An earlier search that seeded this one (`--seed-from`), with what it cost."""

    run_dir: str
    search_cost: SearchCost

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SeedSearch:
        return cls(d["run_dir"], SearchCost.from_dict(d.get("search_cost") or {}))

    def to_dict(self) -> dict:
        return {"run_dir": self.run_dir, "search_cost": self.search_cost.to_dict()}


@dataclass(frozen=True)
class GroupingChoice:
    """What `--grouping auto` measured and chose: the search's starting point (`basis`: its uniform precision, such
    as "W6A6", or "FP" in choices made before tmpq scored quantized starts) on each grouping's default schedule at
    `steps`, scored by the search's fitness; `fp_scores`: the FP model on the same schedules."""

    chosen: str
    scores: dict[str, float]
    timesteps: dict[str, tuple[int, ...]]
    steps: int
    fitness: str
    basis: str = "FP"
    fp_scores: dict[str, float] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GroupingChoice:
        fp = d.get("fp_scores")
        return cls(
            chosen=d["chosen"],
            scores={g: float(v) for g, v in d["scores"].items()},
            timesteps={g: tuple(ts) for g, ts in d["timesteps"].items()},
            steps=int(d["steps"]),
            fitness=d["fitness"],
            basis=d.get("basis", "FP"),
            fp_scores=None if fp is None else {g: float(v) for g, v in fp.items()},
        )

    def to_dict(self) -> dict:
        return {
            "chosen": self.chosen,
            "scores": dict(self.scores),
            "timesteps": {g: list(ts) for g, ts in self.timesteps.items()},
            "steps": self.steps,
            "fitness": self.fitness,
            "basis": self.basis,
            "fp_scores": None if self.fp_scores is None else dict(self.fp_scores),
        }

    def describe(self) -> str:
        """One line: what was chosen and on which scores, e.g. for the CLI's progress output."""
        shown = ", ".join(f"{g} {v:.4g}" for g, v in self.scores.items())
        line = f"{self.chosen} ({self.basis} at {self.steps} steps, {self.fitness}: {shown}"
        if self.fp_scores is not None and self.basis != "FP":
            line += "; FP: " + ", ".join(f"{g} {v:.4g}" for g, v in self.fp_scores.items())
        return line + ")"


@dataclass(frozen=True)
class FpSteps:
    """FID of the FP model by uniform step count on the fitness seeds, and the advice drawn from it (None: sound)."""

    fid: dict[int, float]
    samples: int
    advice: str | None = None
    target: int | None = None  # the proxy's target step count the search used (chosen here when left to it)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FpSteps:
        fids = {int(n): float(f) for n, f in d["fid"].items()}
        return cls(fids, int(d["samples"]), d.get("advice"), d.get("target"))

    def to_dict(self) -> dict:
        return {
            "fid": {str(n): f for n, f in self.fid.items()},
            "samples": self.samples,
            "advice": self.advice,
            "target": self.target,
        }


@dataclass(frozen=True)
class RunSummary:
    """RUN/search.json: the search's best (and its per-phase bits), front, top ten, final re-scoring, cost, and
    everything that produced it (the config as given, the model, its noise schedule, provenance)."""

    best: Record
    quant_configs: tuple[QuantConfig, ...]  # the best's bits, one config per phase
    budget_bitops: int
    budget: str
    fp_bitops_full_100: int
    config: SearchConfig
    model: str
    pareto: tuple[Record, ...] = ()
    top: tuple[Record, ...] = ()  # the ten best by search fitness
    history: tuple[dict, ...] = ()  # one entry per generation
    final: FinalScores | None = None
    search_cost: SearchCost = field(default_factory=SearchCost)
    seed_searches: tuple[SeedSearch, ...] = ()
    grouping: str | None = None  # the one searched (with --grouping auto: the one chosen)
    grouping_choice: GroupingChoice | None = None
    lever: str | None = None  # the one searched (with --lever auto: the one chosen)
    fp_steps: FpSteps | None = None
    model_options: dict = field(default_factory=dict)
    noise_schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    provenance: dict = field(default_factory=dict)

    @property
    def fitness_label(self) -> str:
        f = self.config.fitness
        target = f.reference_steps or (self.fp_steps.target if self.fp_steps else None)  # None: chosen by the search
        name = {"fid": "FID", "kid": "KID", "fid_to_fp": f"FID to FP-{target}"}.get(f.kind, "proxy distance")
        return f"{name} @ {f.num_samples} samples"

    @property
    def model_sha256(self) -> str | None:
        return self.provenance.get("inputs_sha256", {}).get("model")

    def to_dict(self) -> dict:
        best = self.best.to_json() | {"quant_configs": [json.loads(q.to_json()) for q in self.quant_configs]}
        return {
            "best": best,
            "budget_bitops": self.budget_bitops,
            "budget": self.budget,
            "fp_bitops_full_100": self.fp_bitops_full_100,
            "pareto": [r.to_json() for r in self.pareto],
            "history": list(self.history),
            "top": [r.to_json() for r in self.top],
            "final": None if self.final is None else self.final.to_dict(),
            "search_cost": self.search_cost.to_dict(),
            "seed_searches": [s.to_dict() for s in self.seed_searches],
            "config": self.config.to_dict(),
            VERSION_KEY: FORMAT_VERSION,  # of this file and the configs in it
            "grouping": self.grouping,
            "grouping_choice": None if self.grouping_choice is None else self.grouping_choice.to_dict(),
            "lever": self.lever,
            "fp_steps": None if self.fp_steps is None else self.fp_steps.to_dict(),
            "model": self.model,
            "model_options": dict(self.model_options),
            "noise_schedule": self.noise_schedule.to_dict(),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunSummary:
        best = dict(d["best"])
        configs = best.pop("quant_configs", [])
        opt = d.get
        config = SearchConfig.from_dict(d["config"])
        return cls(
            best=Record.from_json(best),
            quant_configs=tuple(QuantConfig.from_json(json.dumps(q)) for q in configs),
            budget_bitops=int(d["budget_bitops"]),
            budget=d["budget"],
            fp_bitops_full_100=int(d["fp_bitops_full_100"]),
            config=config,
            model=d["model"],
            pareto=tuple(Record.from_json(r) for r in opt("pareto") or ()),
            top=tuple(Record.from_json(r) for r in opt("top") or ()),
            history=tuple(opt("history") or ()),
            final=FinalScores.from_dict(d["final"]) if opt("final") else None,
            search_cost=SearchCost.from_dict(opt("search_cost") or {}),
            seed_searches=tuple(SeedSearch.from_dict(s) for s in opt("seed_searches") or ()),
            grouping=opt("grouping"),
            grouping_choice=GroupingChoice.from_dict(d["grouping_choice"]) if opt("grouping_choice") else None,
            lever=d.get("lever", config.search_lever),  # recorded before --lever auto: its own
            fp_steps=FpSteps.from_dict(d["fp_steps"]) if opt("fp_steps") else None,
            model_options=dict(opt("model_options") or {}),
            noise_schedule=schedule_from_dict(d["noise_schedule"]) if opt("noise_schedule") else NoiseSchedule(),
            provenance=dict(opt("provenance") or {}),
        )

    def write(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / SUMMARY_FILE
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def read(cls, source: str | Path, fix: str = "run `tmpq search` or `tmpq run` there first") -> RunSummary:
        """The summary of a finished search (a run directory or its search.json). `fix` is what the error tells the
        user to do when there is none (it differs by command)."""
        path = Path(source)
        path = path / SUMMARY_FILE if path.is_dir() else path
        if not path.is_file():
            raise TmpqError(f"{source} holds no finished search (no {SUMMARY_FILE}); {fix}")
        damaged = f"re-run the same search command to rewrite it, or {fix}"
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TmpqError(f"{path} is not a tmpq search result (not valid JSON: {e}); {damaged}") from None
        if not isinstance(d, dict) or "best" not in d or not isinstance(d.get("config"), dict):
            raise TmpqError(f"{path} is not a tmpq search result (no best candidate or config); {damaged}")
        version = d.get(VERSION_KEY, FORMAT_VERSION)  # files from before the key existed are format 1
        if version != FORMAT_VERSION:
            raise TmpqError(
                f"{path} is a search result of format {version}; this tmpq reads format {FORMAT_VERSION}: use the "
                "tmpq version that wrote it, or re-run the search with this one"
            )
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TmpqError(f"{path} is an incomplete or damaged search result ({e!r}); {damaged}") from None
