"""The joint search space: timestep groups × per-layer bit genes, and the genetic operators on it.

A candidate keeps exactly one timestep per group (so any candidate is a valid, strictly decreasing
schedule) and one (w_bits, a_bits) gene per quantizable unit, optionally one allocation per timestep
phase (e.g. noisy early steps vs detailed late steps). The number of steps K may be searched too.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

from tmpq.errors import TmpqError
from tmpq.quant.config import QuantConfig
from tmpq.sampling.schedules import phase_of, quad_timesteps, uniform_timesteps

Bits = tuple[int | None, int | None]
GROUPINGS = ("quad", "uniform", "change")


def group_starts(kind: str, k: int, num_train_timesteps: int, change: Sequence[float] | None = None) -> tuple[int, ...]:
    """Ascending first timesteps of K groups covering [0, T); group i is [starts[i], starts[i+1]).

    'quad' is the reference rule (int(linspace(0, sqrt(0.8 T), K)^2): short groups near t = 0),
    'uniform' equal widths, 'change' equal shares of a measured per-timestep change profile (groups are
    short where the denoiser's output moves fast along t; see `change_profile`).
    """
    if not 1 <= k <= num_train_timesteps:
        raise TmpqError(f"cannot make {k} timestep groups out of {num_train_timesteps} timesteps")
    if kind == "quad":
        return tuple(sorted(quad_timesteps(k, num_train_timesteps)))
    if kind == "uniform":
        return tuple(sorted(uniform_timesteps(k, num_train_timesteps)))
    if kind == "change":
        if change is None or len(change) != num_train_timesteps:
            raise TmpqError("the 'change' grouping needs a change profile with one value per training timestep")
        total = float(sum(change))
        starts, acc, j = [0], 0.0, 1
        for t, v in enumerate(change):
            acc += float(v)
            while j < k and acc >= total * j / k and t + 1 > starts[-1]:
                starts.append(t + 1)
                j += 1
        while len(starts) < k:  # a flat tail: split the remaining range evenly
            starts.append(starts[-1] + 1)
        if starts[-1] >= num_train_timesteps:
            raise TmpqError("change profile too concentrated to make distinct groups; use fewer steps")
        return tuple(starts)
    raise TmpqError(f"unknown grouping {kind!r}; use one of {GROUPINGS}")


@dataclass(frozen=True)
class Candidate:
    """One point of the space: a decreasing schedule and, per bit phase, one (w, a) per unit."""

    timesteps: tuple[int, ...]
    bits: tuple[tuple[Bits, ...], ...]

    def to_json(self) -> dict:
        return {"timesteps": list(self.timesteps), "bits": [[list(b) for b in phase] for phase in self.bits]}

    @classmethod
    def from_json(cls, d: dict) -> Candidate:
        return cls(tuple(d["timesteps"]), tuple(tuple((b[0], b[1]) for b in phase) for phase in d["bits"]))

    @property
    def key(self) -> str:
        """A stable text key (cache and state files)."""
        t = ",".join(map(str, self.timesteps))
        b = "|".join(";".join(f"{w}/{a}" for w, a in phase) for phase in self.bits)
        return f"{t}#{b}"


@dataclass(frozen=True)
class SearchSpace:
    """Genes and their ranges. Built from a super-network with `SearchSpace.from_supernet`."""

    unit_names: tuple[str, ...]
    w_choices: tuple[tuple[int | None, ...], ...]
    a_choices: tuple[tuple[int | None, ...], ...]
    num_train_timesteps: int = 1000
    steps: tuple[int, ...] = (10,)
    grouping: str = "quad"
    phase_bounds: tuple[int, ...] = ()  # a step at timestep t is in phase #(bounds > t)... see phase_of
    search_timesteps: bool = True
    search_bits: bool = True
    fixed_bits: tuple[Bits, ...] | None = None  # the allocation when search_bits is False
    change: tuple[float, ...] | None = field(default=None, repr=False)
    flow: bool = False  # a flow-matching model: every schedule starts at T − 1 (pure noise), see _make_groups

    def __post_init__(self) -> None:
        n = len(self.unit_names)
        if len(self.w_choices) != n or len(self.a_choices) != n:
            raise TmpqError("w_choices and a_choices need one entry per unit")
        if not self.steps or min(self.steps) < 1:
            raise TmpqError(f"steps must be a non-empty set of positive step counts, got {self.steps}")
        object.__setattr__(self, "steps", tuple(sorted(set(self.steps))))
        bad = [b for b in self.phase_bounds if not 0 < b < self.num_train_timesteps]
        if bad or len(set(self.phase_bounds)) != len(self.phase_bounds):
            raise TmpqError(
                f"phase bounds {list(self.phase_bounds)} must be distinct timesteps in "
                f"1..{self.num_train_timesteps - 1}"
            )
        object.__setattr__(self, "phase_bounds", tuple(sorted(self.phase_bounds, reverse=True)))
        if self.grouping not in GROUPINGS:
            raise TmpqError(f"unknown grouping {self.grouping!r}; use one of {GROUPINGS}")
        if not self.search_bits and self.fixed_bits is None:
            raise TmpqError("a timesteps-only search needs fixed_bits (the precision to keep)")
        if self.fixed_bits is not None and len(self.fixed_bits) != n:
            raise TmpqError("fixed_bits needs one (w, a) per unit")
        for k in self.steps:
            self.groups(k)  # fail early on impossible step counts

    @classmethod
    def from_supernet(cls, supernet, **kwargs) -> SearchSpace:
        names = tuple(supernet.units)
        w = tuple(tuple(u.w_candidates) or (None,) for u in supernet.units.values())
        a = tuple(tuple(u.a_candidates) or (None,) for u in supernet.units.values())
        return cls(names, w, a, **kwargs)

    @property
    def num_phases(self) -> int:
        return len(self.phase_bounds) + 1

    def phase_of(self, t: int) -> int:
        return phase_of(t, self.phase_bounds)

    def groups(self, k: int) -> tuple[tuple[int, int], ...]:
        return self._groups[k] if k in self._groups else self._make_groups(k)

    @cached_property
    def _groups(self) -> dict[int, tuple[tuple[int, int], ...]]:
        return {k: self._make_groups(k) for k in self.steps}

    def _make_groups(self, k: int) -> tuple[tuple[int, int], ...]:
        T = self.num_train_timesteps
        if self.flow:  # a flow sampler starts from pure noise: the noisiest group is the one timestep T − 1
            change = None if self.change is None else self.change[: T - 1]
            starts = (*(group_starts(self.grouping, k - 1, T - 1, change) if k > 1 else ()), T - 1)
        else:
            starts = group_starts(self.grouping, k, T, self.change)
        ends = (*starts[1:], T)
        return tuple(zip(starts, ends))

    def default_timesteps(self, k: int) -> tuple[int, ...]:
        """The first timestep of each group, decreasing: for 'quad' this is the quadratic DDIM schedule."""
        return tuple(lo for lo, _ in reversed(self.groups(k)))

    def uniform_bits(self, w: int | None, a: int | None) -> tuple[Bits, ...]:
        """Every unit at (w, a) where it can be; units with a single choice (pins, matmul weights) keep it."""
        out = []
        for name, wc, ac in zip(self.unit_names, self.w_choices, self.a_choices):
            wb = w if w in wc else wc[0] if len(wc) == 1 else None
            ab = a if a in ac else ac[0] if len(ac) == 1 else None
            if (wb is None and wc != (None,)) or (ab is None and ac != (None,)):
                raise TmpqError(f"unit {name!r} cannot take W{w}A{a} (choices: W {wc}, A {ac})")
            out.append((wb, ab))
        return tuple(out)

    def candidate(self, timesteps: Sequence[int], bits: Sequence[Bits] | Sequence[Sequence[Bits]]) -> Candidate:
        """Build and validate a candidate; a single allocation is repeated over all phases."""
        bits = tuple(bits)
        if bits and isinstance(bits[0][0], (int, type(None))):
            bits = (tuple(bits),) * self.num_phases
        c = Candidate(tuple(int(t) for t in timesteps), tuple(tuple((b[0], b[1]) for b in p) for p in bits))
        self.validate(c)
        return c

    def validate_timesteps(self, timesteps: Sequence[int]) -> None:
        """One timestep inside each group, for a step count this space allows."""
        k = len(timesteps)
        if k not in self.steps:
            raise TmpqError(f"candidate has {k} steps; this space allows {self.steps}")
        for t, (lo, hi) in zip(timesteps, reversed(self.groups(k))):
            if not lo <= t < hi:
                raise TmpqError(f"timestep {t} is outside its group [{lo}, {hi})")

    def validate(self, c: Candidate) -> None:
        self.validate_timesteps(c.timesteps)
        if len(c.bits) != self.num_phases:
            raise TmpqError(f"candidate has {len(c.bits)} bit phases; this space has {self.num_phases}")
        for phase in c.bits:
            if len(phase) != len(self.unit_names):
                raise TmpqError("candidate bit allocation does not match the space's units")
            for name, (w, a), wc, ac in zip(self.unit_names, phase, self.w_choices, self.a_choices):
                if w not in wc or a not in ac:
                    raise TmpqError(f"unit {name!r} got W{w}A{a}, outside its choices W {wc}, A {ac}")

    def quant_configs(self, c: Candidate) -> list[QuantConfig]:
        return [QuantConfig(tuple((n, w, a) for n, (w, a) in zip(self.unit_names, phase))) for phase in c.bits]

    def step_configs(self, c: Candidate) -> list[tuple[int, QuantConfig]]:
        """(timestep, config) for each sampling step, in sampling order."""
        configs = self.quant_configs(c)
        return [(t, configs[self.phase_of(t)]) for t in c.timesteps]

    # --- operators -----------------------------------------------------------------------------------
    def _draw_timesteps(self, k: int, rng: random.Random) -> tuple[int, ...]:
        if not self.search_timesteps:
            return self.default_timesteps(k)
        return tuple(rng.randrange(lo, hi) for lo, hi in reversed(self.groups(k)))

    def _draw_bits(self, rng: random.Random) -> tuple[tuple[Bits, ...], ...]:
        if not self.search_bits:
            return (self.fixed_bits,) * self.num_phases
        return tuple(
            tuple((rng.choice(wc), rng.choice(ac)) for wc, ac in zip(self.w_choices, self.a_choices))
            for _ in range(self.num_phases)
        )

    def random(self, rng: random.Random) -> Candidate:
        k = rng.choice(self.steps)
        return Candidate(self._draw_timesteps(k, rng), self._draw_bits(rng))

    def mutate(self, c: Candidate, rng: random.Random, p: float) -> Candidate:
        """Each gene redrawn with probability p: a timestep inside its group, a bit-width among its choices.

        With several allowed step counts, K changes with probability p too (to a neighbouring count), and
        the schedule is redrawn for the new grouping.
        """
        ts = list(c.timesteps)
        k = len(ts)
        if len(self.steps) > 1 and rng.random() < p:
            i = self.steps.index(k)
            k = self.steps[max(0, min(len(self.steps) - 1, i + rng.choice((-1, 1))))]
            if k != len(ts):
                ts = list(self._draw_timesteps(k, rng) if self.search_timesteps else self.default_timesteps(k))
        if self.search_timesteps:
            for i, (lo, hi) in enumerate(reversed(self.groups(k))):
                if rng.random() < p:
                    ts[i] = rng.randrange(lo, hi)
        bits = [list(phase) for phase in c.bits]
        if self.search_bits:
            for phase in bits:
                for j, (wc, ac) in enumerate(zip(self.w_choices, self.a_choices)):
                    w, a = phase[j]
                    if rng.random() < p:
                        w = rng.choice(wc)
                    if rng.random() < p:
                        a = rng.choice(ac)
                    phase[j] = (w, a)
        return Candidate(tuple(ts), tuple(tuple(p_) for p_ in bits))

    def crossover(self, a: Candidate, b: Candidate, rng: random.Random) -> Candidate:
        """Uniform crossover, gene by gene; parents with different K pass the schedule of one of them whole."""
        if len(a.timesteps) == len(b.timesteps):
            ts = tuple(x if rng.random() < 0.5 else y for x, y in zip(a.timesteps, b.timesteps))
        else:
            ts = a.timesteps if rng.random() < 0.5 else b.timesteps
        bits = tuple(tuple(x if rng.random() < 0.5 else y for x, y in zip(pa, pb)) for pa, pb in zip(a.bits, b.bits))
        return Candidate(ts, bits)
