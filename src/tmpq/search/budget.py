"""What a candidate costs (BitOPs over its whole sampling run) and how to bring it within a budget.

Repair lowers, one gene at a time, the bit-width whose measured sensitivity rises least per BitOP saved
(a greedy knapsack step, as HAWQ-style allocators do), until the candidate fits. It only lowers bits:
a schedule is never changed by repair.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from tmpq.errors import TmpqError
from tmpq.quant.cost import FP_BITS, CostModel
from tmpq.search.space import Candidate, SearchSpace
from tmpq.serialization import DictConfig

Sensitivity = Mapping[str, Mapping[str, Mapping[int, float]]]
"""unit -> {"w": {bits: error}, "a": {bits: error}}: denoiser output error with only that gene quantized."""


@dataclass(frozen=True)
class Budget(DictConfig):
    """A BitOPs budget per generated image, in the user's terms.

    `Budget.like("W6A6", steps=10)`: what uniform W6A6 costs at 10 steps; `Budget.fraction(0.05)`: a share of
    FP at `full_steps`; `Budget.gbitops(12.5)`: an absolute value.
    """

    kind: str
    value: float
    w: int = 0
    a: int = 0
    steps: int = 0

    @classmethod
    def like(cls, setting: str, steps: int) -> Budget:
        m = re.fullmatch(r"W(\d+)A(\d+)", setting.strip().upper())
        if not m:
            raise TmpqError(f"--like {setting!r} is not of the form WxAy (e.g. W6A6)")
        w, a = int(m.group(1)), int(m.group(2))
        if not (1 <= w <= 16 and 1 <= a <= 16):
            raise TmpqError(f"--like {setting!r}: bit-widths must be between 1 and 16")
        if steps < 1:
            raise TmpqError(f"--budget-steps must be >= 1, got {steps}")
        return cls("like", 0.0, w, a, steps)

    @classmethod
    def fraction(cls, frac: float, full_steps: int = 100) -> Budget:
        if not 0 < frac <= 1:
            raise TmpqError(f"a BitOPs fraction must be in (0, 1], got {frac}")
        return cls("fraction", frac, steps=full_steps)

    @classmethod
    def gbitops(cls, value: float) -> Budget:
        if value <= 0:
            raise TmpqError(f"a GBitOPs budget must be positive, got {value}")
        return cls("gbitops", value)

    @classmethod
    def parse(cls, budget: Budget | str | float, steps: int = 10) -> Budget:
        """The one reader of a budget in the user's terms: a `Budget`; "W6A6" (uniform W6A6 at `steps` steps) or
        "W6A6@20"; a float in (0, 1] (that share of FP BitOPs at 100 steps); "35.1G" (absolute GBitOPs per image)."""
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, (int, float)) and not isinstance(budget, bool):
            return cls.fraction(float(budget))
        text = str(budget).strip()
        m = re.fullmatch(r"(W\d+A\d+)(?:@(\d+))?", text, flags=re.IGNORECASE)
        if m:
            return cls.like(m.group(1), int(m.group(2) or steps))
        m = re.fullmatch(r"([0-9.]+)\s*G(?:BitOPs)?", text, flags=re.IGNORECASE)
        if m:
            return cls.gbitops(float(m.group(1)))
        try:
            return cls.fraction(float(text))
        except ValueError:
            raise TmpqError(
                f"budget {budget!r} not understood; use e.g. 'W6A6' / 'W6A6@10' (like a uniform setting), "
                "0.05 (fraction of FP BitOPs at 100 steps) or '35G' (GBitOPs per image)"
            ) from None

    def resolve(self, cost: CandidateCost) -> int:
        if self.kind == "like":
            return cost.uniform_bitops(self.w, self.a, self.steps)
        if self.kind == "fraction":
            return int(self.value * cost.fp_bitops(self.steps))
        return int(self.value * 1e9)

    def describe(self) -> str:
        if self.kind == "like":
            return f"like W{self.w}A{self.a} at {self.steps} steps"
        if self.kind == "fraction":
            return f"{self.value:g} of FP at {self.steps} steps"
        return f"{self.value:g} GBitOPs"


class CandidateCost:
    """BitOPs per generated image of a candidate: Σ over its steps of the step's config BitOPs."""

    def __init__(self, space: SearchSpace, cost: CostModel) -> None:
        missing = [n for n in space.unit_names if n not in cost.units]
        if missing:
            raise TmpqError(f"the cost model has no MACs for unit {missing[0]!r}; rebuild the super-network")
        self.space = space
        self.cost = cost
        self.macs = [cost.units[n].macs for n in space.unit_names]
        self.matmul = [cost.units[n].kind == "matmul" for n in space.unit_names]

    def _gene_cost(self, j: int, w: int | None, a: int | None) -> int:
        a_ = a or FP_BITS
        return self.macs[j] * (a_ * a_ if self.matmul[j] else (w or FP_BITS) * a_)

    def phase_steps(self, c: Candidate) -> list[int]:
        n = [0] * self.space.num_phases
        for t in c.timesteps:
            n[self.space.phase_of(t)] += 1
        return n

    def bitops(self, c: Candidate) -> int:
        per_phase = [sum(self._gene_cost(j, w, a) for j, (w, a) in enumerate(phase)) for phase in c.bits]
        return sum(n * per_phase[p] for p, n in enumerate(self.phase_steps(c)))

    def fp_bitops(self, steps: int) -> int:
        return self.cost.bitops(None, steps)

    def uniform_bitops(self, w: int, a: int, steps: int) -> int:
        """BitOPs of `steps` steps with every unit at WwAa (pins kept): the 'like W6A6 at 10 steps' budget."""
        bits = self.space.uniform_bits(w, a)
        return steps * sum(self._gene_cost(j, wb, ab) for j, (wb, ab) in enumerate(bits))

    def min_bitops(self, steps: int | None = None) -> int:
        """The cheapest candidate of the space (fewest steps, lowest bits), for a clear 'budget too low' error."""
        steps = min(self.space.steps) if steps is None else steps
        sp = self.space
        if sp.search_bits:
            per = sum(
                min(self._gene_cost(j, w, a) for w in wc for a in ac)
                for j, (wc, ac) in enumerate(zip(sp.w_choices, sp.a_choices))
            )
        else:
            per = sum(self._gene_cost(j, w, a) for j, (w, a) in enumerate(sp.fixed_bits))
        return steps * per

    def require_within(self, budget: int, described: str = "") -> None:
        """Refuse a budget below the cheapest candidate of the space, naming that minimum."""
        cheapest = self.min_bitops()
        if cheapest > budget:
            what = f"{described} = " if described else ""
            raise TmpqError(
                f"the budget ({what}{budget / 1e9:.3f} GBitOPs) is below the cheapest candidate of this space "
                f"({cheapest / 1e9:.3f} GBitOPs: {min(self.space.steps)} steps at the lowest bits); "
                "raise the budget or allow fewer steps / lower bit-widths"
            )


class Repairer:
    """Lower the least-sensitive bit genes until a candidate fits the budget."""

    def __init__(self, cost: CandidateCost, sensitivity: Sensitivity | None = None) -> None:
        self.cost = cost
        self.sens = sensitivity or {}

    def _sens(self, name: str, gene: str, bits: int | None) -> float:
        if bits is None:
            return 0.0
        table = self.sens.get(name, {}).get(gene, {})
        if not table:
            return 1.0 / bits  # no measurement: assume error falls with bits, equally for every layer
        return float(table.get(bits, table.get(str(bits), 0.0)))

    def repair(self, c: Candidate, budget: int) -> Candidate | None:
        """The cheapest-in-sensitivity candidate within budget reachable by lowering bits; None if none is."""
        sp, cc = self.cost.space, self.cost
        total = cc.bitops(c)
        if total <= budget:
            return c
        if not sp.search_bits or cc.min_bitops(len(c.timesteps)) > budget:
            return None
        bits = [list(phase) for phase in c.bits]
        nsteps = cc.phase_steps(c)
        while total > budget:
            best = None
            for p, phase in enumerate(bits):
                if nsteps[p] == 0:
                    continue
                for j, (w, a) in enumerate(phase):
                    name = sp.unit_names[j]
                    for gene, cur, choices in (("w", w, sp.w_choices[j]), ("a", a, sp.a_choices[j])):
                        lower = [b for b in choices if b is not None and (cur is None or b < cur)]
                        if not lower:
                            continue
                        nxt = max(lower)
                        new = (nxt, a) if gene == "w" else (w, nxt)
                        saved = nsteps[p] * (cc._gene_cost(j, w, a) - cc._gene_cost(j, *new))
                        if saved <= 0:
                            continue
                        harm = self._sens(name, gene, nxt) - self._sens(name, gene, cur)
                        score = max(harm, 0.0) / saved
                        if best is None or score < best[0]:
                            best = (score, p, j, new, saved)
            if best is None:
                return None
            _, p, j, new, saved = best
            bits[p][j] = new
            total -= saved
        return Candidate(c.timesteps, tuple(tuple(phase) for phase in bits))
