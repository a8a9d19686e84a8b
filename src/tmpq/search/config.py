"""What one search is asked to do (`SearchConfig`): the budget, the space, the evolution, the fitness, calibration and
the final re-scoring, validated before any compute, with the one default per setting."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
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
"""--grouping auto: the grouping whose default schedule the FP model scores best on, under the search's fitness."""


@dataclass(frozen=True)
class SearchConfig(DictConfig):
    budget: Budget = Budget.like("W6A6", 10)
    steps: tuple[int, ...] = (10,)
    # the grouping whose default schedule the FP model scores best on (quad, uniform, change), measured first; on the
    # built-in model FP at 10 steps scores 166.5 on uniform against 218.6 on quad (docs/results.md)
    grouping: str = AUTO
    phase_bounds: tuple[int, ...] = ()
    lever: str = "joint"  # joint | bits (schedule fixed) | timesteps (precision fixed)
    fixed_precision: str = "W6A6"  # the precision of a timesteps-only search
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
        if self.lever not in LEVERS:
            raise TmpqError(f"lever must be one of {LEVERS}, got {self.lever!r}")
        if self.staged and self.lever != "joint":
            raise TmpqError("a staged search ends in a joint search; drop --staged or use --lever joint")
        # checked here, before any compute: a budget or precision outside the calibrated widths would only fail
        # after a full calibration otherwise
        w_all, a_all = self.quant.w_bits, self.quant.a_bits
        if self.budget.kind == "like":
            _require_widths(f"--like W{self.budget.w}A{self.budget.a}", self.budget.w, self.budget.a, w_all, a_all)
        if self.lever == "timesteps" or (self.staged and self.budget.kind != "like"):  # see _run_stages
            _require_widths(
                f"--fixed-precision {self.fixed_precision}", *precision_of(self.fixed_precision), w_all, a_all
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
