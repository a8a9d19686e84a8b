"""What one search is asked to do (`SearchConfig`): the budget, the space, the evolution, the fitness, calibration and
the final re-scoring, validated before any compute, with the one default per setting."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from tmpq.errors import TmpqError
from tmpq.quant.calibration import CalibConfig
from tmpq.quant.config import QuantSpec
from tmpq.search.budget import Budget
from tmpq.search.evolution import EvolutionConfig
from tmpq.search.fitness import FitnessConfig
from tmpq.search.space import GROUPINGS
from tmpq.serialization import DictConfig

LEVERS = ("joint", "bits", "timesteps")
AUTO = "auto"
"""--grouping auto: the grouping on whose default schedule the search's start scores best, under the search's fitness.
--lever auto: see `SearchConfig.search_lever`."""


@dataclass(frozen=True)
class SearchConfig(DictConfig):
    budget: Budget = Budget.like("W6A6", 10)
    steps: tuple[int, ...] = (10,)
    # the grouping whose default schedule the FP model scores best on (quad, uniform, change), measured first; on the
    # built-in model FP at 10 steps scores 166.5 on uniform against 218.6 on quad (docs/results.md)
    grouping: str = AUTO
    phase_bounds: tuple[int, ...] = ()
    # joint | bits (schedule fixed) | timesteps (precision fixed) | auto: timesteps at the budget's precision for a
    # --like budget, else joint (`search_lever`); on the built-in model with BRECQ, W6A6@10, timesteps 53.19 FID
    # against joint 57.82 and staged 53.57 at 3x the search (5,000 samples, docs/results.md)
    lever: str = AUTO
    fixed_precision: str | None = None  # the precision of a timesteps-only search; None: the --like budget's
    evolution: EvolutionConfig = EvolutionConfig()
    fitness: FitnessConfig = FitnessConfig()
    calib: CalibConfig = CalibConfig()
    quant: QuantSpec = QuantSpec()
    sensitivity_inputs: int = 32
    seed_candidates: bool = True  # start from the default schedule at the budget's uniform precision
    seed_from: tuple[str, ...] = ()  # finished search directories whose best candidates seed this search
    staged: bool = False  # bits-only and timesteps-only searches first (RUN/stages/), then the joint one seeded
    final_samples: int = 1000  # > 0: re-score the top `final_top` and the uniform baseline with this many samples
    final_top: int = 3
    # > final_top: the search's best `final_pool`, re-ranked by the fitness on fresh seeds, feed the final table (a
    # search's best on its own seeds are mostly its luckiest draws: docs/results.md, 'Racing ...'); 0: off
    final_pool: int = 12
    fid_reference: str = "fashion-mnist"  # FID (search and final) against this: 'fashion-mnist' or an image folder
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lever not in (*LEVERS, AUTO):
            raise TmpqError(f"--lever must be one of {[*LEVERS, AUTO]}, got {self.lever!r}")
        if self.staged and self.lever not in ("joint", AUTO):
            raise TmpqError("a staged search ends in a joint search; drop --staged or use --lever joint")
        # checked here, before any compute: a budget or precision outside the calibrated widths would only fail
        # after a full calibration otherwise
        w_all, a_all = self.quant.w_bits, self.quant.a_bits
        if self.budget.kind == "like":
            _require_widths(f"--like W{self.budget.w}A{self.budget.a}", self.budget.w, self.budget.a, w_all, a_all)
        if self.search_lever == "timesteps" or self.staged:  # a staged search runs a timesteps-only one first
            if self.timesteps_precision is None:
                raise TmpqError(
                    "a timesteps-only search keeps one precision for every layer, and this budget names none: give "
                    "--fixed-precision WxAy, or a --like WxAy budget (whose precision it then keeps)"
                )
            _require_widths(
                f"--fixed-precision {self.timesteps_precision}", *precision_of(self.timesteps_precision), w_all, a_all
            )
        if self.grouping not in (*GROUPINGS, AUTO):
            raise TmpqError(f"--grouping must be one of {[*GROUPINGS, AUTO]}, got {self.grouping!r}")
        if self.final_samples < 0 or self.final_samples == 1 or self.final_top < 1:
            raise TmpqError(
                f"--final-samples must be 0 (skip) or >= 2 and --final-top >= 1, got {self.final_samples} and "
                f"{self.final_top}"
            )
        if self.final_pool and self.final_pool <= self.final_top:
            raise TmpqError(
                f"--final-pool {self.final_pool} must be 0 (off) or more than --final-top {self.final_top}: it is how "
                "many of the search's best are re-ranked on fresh seeds, of which the final table takes the top; "
                "raise --final-pool or pass --final-pool 0"
            )
        if self.fid_reference != "fashion-mnist" and not Path(self.fid_reference).is_dir():
            raise TmpqError(
                f"--fid-reference {self.fid_reference!r} is neither 'fashion-mnist' nor a folder of images; "
                "pass one of them"
            )
        bounds = self.phase_bounds
        if len(set(bounds)) != len(bounds) or any(b < 1 for b in bounds):
            raise TmpqError(f"--phases {','.join(map(str, bounds))}: give distinct timesteps >= 1, e.g. 500 or 300,700")

    @property
    def search_lever(self) -> str:
        """The lever searched: `lever`, or for `auto` the timesteps at the budget's precision when the budget is
        `--like WxAy` (it names the precision) and not staged, else the joint search. Why timesteps: on the built-in
        model its 10 genes leave the least room for the winner's curse (a search's best on 128 samples being its
        luckiest draw), and it shipped the best sampler measured (docs/results.md, 'What tmpq run ships')."""
        if self.lever != AUTO:
            return self.lever
        return "timesteps" if self.budget.kind == "like" and not self.staged else "joint"

    @property
    def timesteps_precision(self) -> str | None:
        """The WxAy a timesteps-only search (or stage) keeps: --fixed-precision, else the --like budget's; None when
        neither names one."""
        if self.fixed_precision is not None:
            return precision_label(*precision_of(self.fixed_precision))
        return precision_label(self.budget.w, self.budget.a) if self.budget.kind == "like" else None

    def resolved(self) -> SearchConfig:
        """This config with a concrete lever and, for a timesteps-only search, only the widths it uses calibrated
        (its precision and a --like budget's; pinned layers keep their pins): BRECQ at the other widths would cost
        four times as long, for nothing. A calibrated super-network that covers more widths is reused
        (`QuantSpec.covers`)."""
        lever = self.search_lever
        if lever != "timesteps":
            return replace(self, lever=lever)
        w, a = precision_of(self.timesteps_precision)
        ws, as_ = {w}, {a}
        if self.budget.kind == "like":  # the budget's cost is that of its own uniform setting
            ws, as_ = ws | {self.budget.w}, as_ | {self.budget.a}
        quant = self.quant.narrowed(ws, as_)
        return replace(self, lever=lever, fixed_precision=self.timesteps_precision, quant=quant)

    def to_json(self) -> dict:
        """Deprecated name of `to_dict` (the one serialization of every config); kept for one release."""
        warnings.warn("SearchConfig.to_json() is deprecated; use .to_dict()", DeprecationWarning, stacklevel=2)
        return self.to_dict()


def precision_of(setting: str) -> tuple[int, int]:
    """(w, a) of a WxAy setting."""
    b = Budget.like(setting, 1)
    return b.w, b.a


def precision_label(w: int, a: int) -> str:
    """The WxAy setting of (w, a): the inverse of `precision_of`."""
    return f"W{w}A{a}"


def _require_widths(what: str, w: int, a: int, w_all: tuple[int, ...], a_all: tuple[int, ...]) -> None:
    if w not in w_all:
        raise TmpqError(
            f"{what}: {w}-bit weights are not among the candidate widths {list(w_all)}; add {w} to "
            "--w-bits or pick another setting"
        )
    if a not in a_all:
        raise TmpqError(
            f"{what}: {a}-bit activations are not among the candidate widths {list(a_all)}; add {a} to "
            "--a-bits or pick another setting"
        )
