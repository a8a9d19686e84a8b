"""Evolutionary search over the joint space, with the TMPQ-DM reference operators as one preset.

Each generation keeps the best `parents` candidates (elitism), then adds mutations, uniform crossovers
and fresh random candidates, never one already evaluated. Over-budget children are repaired (lower the
least-sensitive bits) or, as in the reference, discarded. The multi-objective mode ranks by NSGA-II
(non-dominated sorting on (fitness, BitOPs), then crowding distance; both from pymoo) and returns the
Pareto front of everything evaluated.

State is written atomically after every evaluation, so a killed search resumes with nothing lost, and
the RNG state is saved with it: a resumed run ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tmpq.errors import TmpqError
from tmpq.fileio import write_json_atomic
from tmpq.search.budget import CandidateCost, Repairer
from tmpq.search.space import Candidate, SearchSpace

STATE_VERSION = 1


@dataclass(frozen=True)
class FitnessValue:
    value: float  # lower is better (FID, or a proxy distance)
    forwards: int  # denoiser image-forwards spent on this evaluation
    extra: dict = field(default_factory=dict)


Fitness = Callable[[Candidate], FitnessValue]


@dataclass(frozen=True)
class EvolutionConfig:
    """The evolutionary search's settings; the defaults are tmpq's frugal preset (`tmpq()`), `reference()` the
    authors' released ones."""

    population: int = 24
    parents: int = 8
    mutations: int = 10
    crossovers: int = 4
    randoms: int = 2
    generations: int = 10
    p_mutation: float = 0.25
    repair: bool = True
    multi_objective: bool = False
    max_draws: int = 2000  # tries per generation to find feasible, unseen children
    seed: int = 0

    def __post_init__(self) -> None:
        if self.parents < 1 or self.generations < 1 or self.population < self.parents:
            raise TmpqError("need generations >= 1 and population >= parents >= 1")
        if not 0 <= self.p_mutation <= 1:
            raise TmpqError(f"p_mutation must be in [0, 1], got {self.p_mutation}")

    @classmethod
    def reference(cls, **overrides) -> EvolutionConfig:
        """The authors' released settings: population 50, top 10, 25 mutations, 10 crossovers, 15 random,
        20 generations, p = 0.25, over-budget candidates discarded."""
        base = dict(population=50, parents=10, mutations=25, crossovers=10, randoms=15, generations=20, repair=False)
        return cls(**{**base, **overrides})

    @classmethod
    def tmpq(cls, **overrides) -> EvolutionConfig:
        """tmpq's frugal default (the class defaults): a smaller population over fewer generations, with repair."""
        return cls(**overrides)


@dataclass
class Record:
    candidate: Candidate
    value: float
    bitops: int
    forwards: int
    wall_s: float
    generation: int
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["candidate"] = self.candidate.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict) -> Record:
        return cls(**{**d, "candidate": Candidate.from_json(d["candidate"])})


@dataclass
class SearchResult:
    best: Record
    pareto: list[Record]
    records: list[Record]
    history: list[dict]
    forwards: int
    wall_s: float
    budget: int
    supernet: object = field(default=None, repr=False)  # set by run_search: what a sampler is built from

    def top(self, n: int) -> list[Record]:
        return sorted(self.records, key=lambda r: (r.value, r.bitops))[:n]


def pareto_front(records: Sequence[Record]) -> list[Record]:
    """Records not dominated on (value, bitops), sorted by bitops."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    if not records:
        return []
    f = np.array([[r.value, r.bitops] for r in records], dtype=float)
    front = NonDominatedSorting().do(f, only_non_dominated_front=True)
    return sorted((records[i] for i in front), key=lambda r: (r.bitops, r.value))


def _nsga2_order(records: Sequence[Record]) -> list[Record]:
    from pymoo.operators.survival.rank_and_crowding.metrics import calc_crowding_distance
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    f = np.array([[r.value, r.bitops] for r in records], dtype=float)
    order: list[Record] = []
    for front in NonDominatedSorting().do(f):
        crowd = calc_crowding_distance(f[front]) if len(front) > 2 else np.full(len(front), np.inf)
        ranked = sorted(zip(front, crowd), key=lambda fc: (-fc[1], records[fc[0]].value, records[fc[0]].bitops))
        order += [records[i] for i, _ in ranked]
    return order


class EvolutionarySearch:
    def __init__(
        self,
        space: SearchSpace,
        fitness: Fitness,
        cost: CandidateCost,
        budget: int,
        config: EvolutionConfig = EvolutionConfig(),
        state_path: str | Path | None = None,
        repairer: Repairer | None = None,
        initial: Sequence[Candidate] = (),
        progress: bool = True,
        run_info: dict | None = None,
        evaluator=None,
    ) -> None:
        """`fitness` scores one candidate in this process; `evaluator` (see search/parallel.py), when given,
        scores batches of them elsewhere (worker processes, Ray) and takes precedence."""
        self.space, self.fitness, self.cost, self.budget, self.config = space, fitness, cost, int(budget), config
        self.evaluator = evaluator
        self.state_path = None if state_path is None else Path(state_path)
        self.repairer = repairer or (Repairer(cost) if config.repair else None)
        self.initial = list(initial)
        self.progress = progress
        self.run_info = run_info or {}
        cost.require_within(self.budget)

    # --- state ----------------------------------------------------------------------------------------
    def _fresh_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "budget": self.budget,
            "run_info": self.run_info,
            "generation": 0,
            "rng": None,
            "parents": [],
            "pending": [],
            "records": {},
            "history": [],
            "done": False,
            "wall_s": 0.0,
        }

    def _save(self, state: dict) -> None:
        if self.state_path is None:
            return
        write_json_atomic(self.state_path, state, indent=None)

    def _load(self) -> dict | None:
        if self.state_path is None or not self.state_path.is_file():
            return None
        try:
            state = json.loads(self.state_path.read_text())
        except json.JSONDecodeError:
            raise TmpqError(f"search state {self.state_path} is damaged (not JSON); delete it to start over") from None
        if state.get("version") != STATE_VERSION:
            raise TmpqError(f"search state {self.state_path} has another version; start a new run directory")
        if state["config"] != json.loads(json.dumps(asdict(self.config))) or state["budget"] != self.budget:
            raise TmpqError(
                f"search state {self.state_path} was made with another search config or budget; "
                "resume with the same settings, or use a new run directory"
            )
        return state

    # --- operators with budget handling --------------------------------------------------------------
    def _feasible(self, c: Candidate) -> Candidate | None:
        if self.cost.bitops(c) <= self.budget:
            return c
        return self.repairer.repair(c, self.budget) if self.repairer is not None else None

    def _children(self, rng: random.Random, parents: list[Candidate], seen: set[str]) -> list[Candidate]:
        cfg = self.config
        out: list[Candidate] = []

        def fill(n: int, make: Callable[[], Candidate]) -> None:
            got, tries = 0, 0
            while got < n and tries < cfg.max_draws:
                tries += 1
                c = self._feasible(make())
                if c is not None and c.key not in seen:
                    seen.add(c.key)
                    out.append(c)
                    got += 1

        fill(cfg.mutations, lambda: self.space.mutate(rng.choice(parents), rng, cfg.p_mutation))
        fill(cfg.crossovers, lambda: self.space.crossover(rng.choice(parents), rng.choice(parents), rng))
        fill(cfg.randoms, lambda: self.space.random(rng))
        return out

    def _select(self, records: list[Record]) -> list[Record]:
        if self.config.multi_objective:
            return _nsga2_order(records)[: self.config.parents]
        return sorted(records, key=lambda r: (r.value, r.bitops, r.candidate.key))[: self.config.parents]

    # --- the loop --------------------------------------------------------------------------------------
    def run(self, resume: bool = True) -> SearchResult:
        state = self._load() if resume else None
        if state is None:
            state = self._fresh_state()
            rng = random.Random(self.config.seed)
            seen: set[str] = set()
            init: list[Candidate] = []
            for c in self.initial:
                self.space.validate(c)
                fc = self._feasible(c)
                if fc is not None and fc.key not in seen:
                    seen.add(fc.key)
                    init.append(fc)
            tries = 0
            while len(init) < self.config.population and tries < self.config.max_draws * 10:
                tries += 1
                c = self._feasible(self.space.random(rng))
                if c is not None and c.key not in seen:
                    seen.add(c.key)
                    init.append(c)
            if not init:
                raise TmpqError("no feasible candidate found within the budget; raise the budget or enable repair")
            state["pending"] = [c.to_json() for c in init]
            state["rng"] = _rng_to_json(rng.getstate())
            self._save(state)
        records = {k: Record.from_json(v) for k, v in state["records"].items()}
        cfg = self.config
        bar = tqdm(
            total=cfg.generations,
            initial=state["generation"],
            desc="search",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        bar.set_postfix(evals=len(records))  # a resumed search shows what it already holds
        t_start = time.perf_counter() - state["wall_s"]
        from tmpq.search.parallel import SerialEvaluator  # parallel.py imports this module

        evaluator = self.evaluator or SerialEvaluator(self.fitness)
        try:
            while not state["done"]:
                gen = state["generation"]
                pending = [Candidate.from_json(d) for d in state["pending"]]
                todo = [c for c in pending if c.key not in records]
                t_gen, busy = time.perf_counter(), 0.0
                for c, fv, seconds in evaluator.evaluate(todo):  # in completion order; records are keyed
                    rec = Record(
                        c,
                        float(fv.value),
                        self.cost.bitops(c),
                        int(fv.forwards),
                        round(seconds, 3),
                        gen,
                        dict(fv.extra),
                    )
                    busy += seconds
                    records[c.key] = rec
                    state["records"][c.key] = rec.to_json()
                    state["wall_s"] = time.perf_counter() - t_start
                    self._save(state)
                    bar.set_postfix(evals=len(records), refresh=False)
                gen_wall = time.perf_counter() - t_gen
                pool = [records[k] for k in state["parents"]] + [records[c.key] for c in pending]
                parents = self._select(pool)
                best = min(pool, key=lambda r: (r.value, r.bitops))
                state["history"].append(
                    {
                        "generation": gen,
                        "best_value": best.value,
                        "best_bitops": best.bitops,
                        "best_key": best.candidate.key,
                        "evaluated": len(records),
                        "forwards": sum(r.forwards for r in records.values()),
                        "wall_s": round(time.perf_counter() - t_start, 2),
                        "workers": evaluator.workers,
                        "evals_per_min": round(60 * len(todo) / gen_wall, 2) if todo and gen_wall > 0 else None,
                        "utilisation": round(busy / (evaluator.workers * gen_wall), 3)
                        if todo and gen_wall > 0
                        else None,
                    }
                )
                bar.update(1)
                rate = state["history"][-1]["evals_per_min"]
                bar.set_postfix(
                    best=f"{best.value:.3f}",
                    gbitops=f"{best.bitops / 1e9:.2f}",
                    evals=len(records),
                    per_min="-" if rate is None else f"{rate:.1f}",
                )
                if gen + 1 >= cfg.generations:
                    state["done"] = True
                    state["parents"] = [r.candidate.key for r in parents]
                    state["pending"] = []
                else:
                    rng = random.Random()
                    rng.setstate(_rng_from_json(state["rng"]))
                    children = self._children(rng, [r.candidate for r in parents], set(records))
                    state["parents"] = [r.candidate.key for r in parents]
                    state["pending"] = [c.to_json() for c in children]
                    state["rng"] = _rng_to_json(rng.getstate())
                    state["generation"] = gen + 1
                state["wall_s"] = time.perf_counter() - t_start
                self._save(state)
        finally:
            bar.close()
            evaluator.close()
        return self._result(state, records)

    def _result(self, state: dict, records: dict[str, Record]) -> SearchResult:
        recs = list(records.values())
        within = [r for r in recs if r.bitops <= self.budget]
        best = min(within, key=lambda r: (r.value, r.bitops))
        return SearchResult(
            best=best,
            pareto=pareto_front(within),
            records=recs,
            history=state["history"],
            forwards=sum(r.forwards for r in recs),
            wall_s=round(state["wall_s"], 2),
            budget=self.budget,
        )


def _rng_to_json(st: tuple) -> list:
    return [st[0], list(st[1]), st[2]]


def _rng_from_json(d: list) -> tuple:
    return (d[0], tuple(d[1]), d[2])
