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
from tmpq.serialization import DictConfig

STATE_VERSION = 1


@dataclass(frozen=True)
class FitnessValue:
    value: float  # lower is better (FID, or a proxy distance)
    forwards: int  # denoiser image-forwards spent on this evaluation
    extra: dict = field(default_factory=dict)


Fitness = Callable[[Candidate], FitnessValue]


@dataclass(frozen=True)
class EvolutionConfig(DictConfig):
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


@dataclass
class SearchState:
    """Everything a search needs to continue exactly where it stopped; plain JSON on disk (no pickle), the same
    layout as before this class existed, so older run directories resume."""

    config: dict
    budget: int
    run_info: dict = field(default_factory=dict)
    generation: int = 0
    rng: list | None = None  # random.Random state, as JSON
    parents: list[str] = field(default_factory=list)  # candidate keys
    pending: list[Candidate] = field(default_factory=list)  # this generation's candidates
    records: dict[str, Record] = field(default_factory=dict)  # every evaluation, by candidate key
    history: list[dict] = field(default_factory=list)  # one entry per finished generation
    done: bool = False
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "config": self.config,
            "budget": self.budget,
            "run_info": self.run_info,
            "generation": self.generation,
            "rng": self.rng,
            "parents": list(self.parents),
            "pending": [c.to_json() for c in self.pending],
            "records": {k: r.to_json() for k, r in self.records.items()},
            "history": self.history,
            "done": self.done,
            "wall_s": self.wall_s,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SearchState:
        try:
            return cls(
                config=d["config"],
                budget=d["budget"],
                run_info=d.get("run_info", {}),
                generation=d["generation"],
                rng=d["rng"],
                parents=list(d["parents"]),
                pending=[Candidate.from_json(c) for c in d["pending"]],
                records={k: Record.from_json(v) for k, v in d["records"].items()},
                history=list(d["history"]),
                done=bool(d["done"]),
                wall_s=float(d["wall_s"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TmpqError(f"the search state is incomplete or damaged ({e}); start over with --fresh") from None


class SearchCallback:
    """Hooks into the search loop (checkpoints, progress, logging); every hook does nothing by default."""

    def on_start(self, state: SearchState) -> None: ...

    def on_record(self, state: SearchState, record: Record) -> None: ...

    def on_generation(self, state: SearchState, entry: dict) -> None: ...

    def on_end(self, state: SearchState) -> None: ...


class Checkpoint(SearchCallback):
    """Writes the state atomically at the start, after every evaluation and after every generation."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def _save(self, state: SearchState) -> None:
        if self.path is not None:
            write_json_atomic(self.path, state.to_dict(), indent=None)

    def on_start(self, state: SearchState) -> None:
        self._save(state)

    def on_record(self, state: SearchState, record: Record) -> None:
        self._save(state)

    def on_generation(self, state: SearchState, entry: dict) -> None:
        self._save(state)


class ProgressBar(SearchCallback):
    """A tqdm bar over generations with the best value, its GBitOPs and the evaluation rate."""

    def __init__(self, generations: int) -> None:
        self.generations = generations
        self.bar: tqdm | None = None

    def on_start(self, state: SearchState) -> None:
        self.bar = tqdm(total=self.generations, initial=len(state.history), desc="search", dynamic_ncols=True)
        self.bar.set_postfix(evals=len(state.records))  # a resumed search shows what it already holds

    def on_record(self, state: SearchState, record: Record) -> None:
        self.bar.set_postfix(evals=len(state.records), refresh=False)

    def on_generation(self, state: SearchState, entry: dict) -> None:
        rate = entry.get("evals_per_min")
        self.bar.update(1)
        self.bar.set_postfix(
            best=f"{entry['best_value']:.3f}",
            gbitops=f"{entry['best_bitops'] / 1e9:.2f}",
            evals=len(state.records),
            per_min="-" if rate is None else f"{rate:.1f}",
        )

    def on_end(self, state: SearchState) -> None:
        if self.bar is not None:
            self.bar.close()


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
    def _fresh_state(self) -> SearchState:
        return SearchState(config=self.config.to_dict(), budget=self.budget, run_info=self.run_info)

    def _load(self) -> SearchState | None:
        if self.state_path is None or not self.state_path.is_file():
            return None
        try:
            d = json.loads(self.state_path.read_text())
        except json.JSONDecodeError:
            raise TmpqError(f"search state {self.state_path} is damaged (not JSON); delete it to start over") from None
        if not isinstance(d, dict) or d.get("version") != STATE_VERSION:
            raise TmpqError(f"search state {self.state_path} has another version; start a new run directory")
        if d["config"] != self.config.to_dict() or d["budget"] != self.budget:
            raise TmpqError(
                f"search state {self.state_path} was made with another search config or budget; "
                "resume with the same settings, or use a new run directory"
            )
        return SearchState.from_dict(d)

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

    # --- ask / tell -----------------------------------------------------------------------------------
    def start(self, resume: bool = True) -> SearchState:
        """The saved state when resuming (and one exists), else a fresh one holding the first population."""
        state = self._load() if resume else None
        if state is not None:
            return state
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
        state.pending = init
        state.rng = _rng_to_json(rng.getstate())
        return state

    def ask(self, state: SearchState) -> list[Candidate]:
        """This generation's candidates that still need a fitness (none after a kill lost nothing)."""
        return [c for c in state.pending if c.key not in state.records]

    def tell(self, state: SearchState, candidate: Candidate, fv: FitnessValue, seconds: float) -> Record:
        """Record one evaluated candidate (in any order: records are keyed)."""
        rec = Record(
            candidate,
            float(fv.value),
            self.cost.bitops(candidate),
            int(fv.forwards),
            round(seconds, 3),
            state.generation,
            dict(fv.extra),
        )
        state.records[candidate.key] = rec
        return rec

    def advance(self, state: SearchState, stats: dict | None = None) -> dict:
        """Close the generation once every asked candidate is told: select parents, log the history entry (with
        the evaluator's `stats`), then breed the next generation's candidates or mark the search done."""
        if self.ask(state):
            raise TmpqError("advance() before every asked candidate was told")
        gen, records = state.generation, state.records
        pool = [records[k] for k in state.parents] + [records[c.key] for c in state.pending]
        parents = self._select(pool)
        best = min(pool, key=lambda r: (r.value, r.bitops))
        entry = {
            "generation": gen,
            "best_value": best.value,
            "best_bitops": best.bitops,
            "best_key": best.candidate.key,
            "evaluated": len(records),
            "forwards": sum(r.forwards for r in records.values()),
            **(stats or {}),
        }
        state.history.append(entry)
        state.parents = [r.candidate.key for r in parents]
        if gen + 1 >= self.config.generations:
            state.done, state.pending = True, []
        else:
            rng = random.Random()
            rng.setstate(_rng_from_json(state.rng))
            state.pending = self._children(rng, [r.candidate for r in parents], set(records))
            state.rng = _rng_to_json(rng.getstate())
            state.generation = gen + 1
        return entry

    # --- the loop --------------------------------------------------------------------------------------
    def run(self, resume: bool = True, callbacks: Sequence[SearchCallback] = ()) -> SearchResult:
        """ask → evaluate → tell until the last generation; the state is checkpointed after every evaluation and
        progress shown through callbacks, so a killed search resumes exactly where it stopped."""
        state = self.start(resume)
        hooks: list[SearchCallback] = [Checkpoint(self.state_path), *callbacks]
        if self.progress:
            hooks.append(ProgressBar(self.config.generations))
        from tmpq.search.parallel import SerialEvaluator  # parallel.py imports this module

        evaluator = self.evaluator or SerialEvaluator(self.fitness)
        t_start = time.perf_counter() - state.wall_s
        for h in hooks:
            h.on_start(state)
        try:
            while not state.done:
                todo = self.ask(state)
                t_gen, busy = time.perf_counter(), 0.0
                for c, fv, seconds in evaluator.evaluate(todo):  # in completion order
                    rec = self.tell(state, c, fv, seconds)
                    busy += seconds
                    state.wall_s = time.perf_counter() - t_start
                    for h in hooks:
                        h.on_record(state, rec)
                gen_wall = time.perf_counter() - t_gen
                measured = bool(todo) and gen_wall > 0
                entry = self.advance(
                    state,
                    {
                        "wall_s": round(time.perf_counter() - t_start, 2),
                        "workers": evaluator.workers,
                        "evals_per_min": round(60 * len(todo) / gen_wall, 2) if measured else None,
                        "utilisation": round(busy / (evaluator.workers * gen_wall), 3) if measured else None,
                    },
                )
                state.wall_s = time.perf_counter() - t_start
                for h in hooks:
                    h.on_generation(state, entry)
        finally:
            for h in hooks:
                h.on_end(state)
            evaluator.close()
        return self.result(state)

    def result(self, state: SearchState) -> SearchResult:
        """The result of a (finished or partial) state: best within budget, Pareto front, every record."""
        recs = list(state.records.values())
        within = [r for r in recs if r.bitops <= self.budget]
        best = min(within, key=lambda r: (r.value, r.bitops))
        return SearchResult(
            best=best,
            pareto=pareto_front(within),
            records=recs,
            history=state.history,
            forwards=sum(r.forwards for r in recs),
            wall_s=round(state.wall_s, 2),
            budget=self.budget,
        )


def _rng_to_json(st: tuple) -> list:
    return [st[0], list(st[1]), st[2]]


def _rng_from_json(d: list) -> tuple:
    return (d[0], tuple(d[1]), d[2])
