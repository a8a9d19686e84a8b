from __future__ import annotations

import json
from collections import Counter

import pytest

from tmpq.errors import TmpqError
from tmpq.quant.cost import CostModel, UnitCost
from tmpq.search.budget import CandidateCost, Repairer
from tmpq.search.evolution import EvolutionarySearch, EvolutionConfig, FitnessValue, pareto_front
from tmpq.search.space import Candidate, SearchSpace

NAMES = ("u0", "u1", "u2", "u3")
MACS = {"u0": 100, "u1": 400, "u2": 200, "u3": 50}


def space(**kw) -> SearchSpace:
    return SearchSpace(NAMES, ((2, 4, 8),) * 4, ((4, 8),) * 4, num_train_timesteps=60, steps=(4,), **kw)


def cost_of(sp: SearchSpace) -> CandidateCost:
    return CandidateCost(sp, CostModel({n: UnitCost("conv", m, 10, 0) for n, m in MACS.items()}))


TARGET = (50, 25, 8, 1)  # inside the 4 quad groups of T = 60


class ToyFitness:
    """Known optimum: the TARGET schedule, and as many bits as possible on the big layers."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.calls: Counter[str] = Counter()
        self.stop_after = stop_after

    def __call__(self, c: Candidate) -> FitnessValue:
        if self.stop_after is not None and sum(self.calls.values()) >= self.stop_after:
            raise KeyboardInterrupt
        self.calls[c.key] += 1
        dist = sum(abs(a - b) for a, b in zip(c.timesteps, TARGET))
        bits_loss = sum(MACS[n] * (1 / w + 1 / a) for n, (w, a) in zip(NAMES, c.bits[0])) / 1000
        return FitnessValue(dist + bits_loss, forwards=10)


def test_groups_of_toy_space_hold_target():
    sp = space()
    sp.candidate(TARGET, sp.uniform_bits(8, 8))


def test_finds_known_optimum_without_budget_pressure():
    sp = space()
    cc = cost_of(sp)
    budget = cc.uniform_bitops(8, 8, 4)
    cfg = EvolutionConfig.reference(generations=30, seed=0)
    fit = ToyFitness()
    res = EvolutionarySearch(sp, fit, cc, budget, cfg, progress=False).run()
    assert res.best.candidate.timesteps == TARGET
    assert res.best.candidate.bits[0] == sp.uniform_bits(8, 8)
    assert max(fit.calls.values()) == 1  # the cache: nothing evaluated twice
    assert len(res.records) == len(fit.calls) and res.forwards == 10 * len(fit.calls)


@pytest.mark.parametrize("repair", [False, True])
def test_budget_respected(repair):
    sp = space()
    cc = cost_of(sp)
    budget = cc.uniform_bitops(4, 4, 4)
    cfg = EvolutionConfig(population=20, parents=5, mutations=8, crossovers=4, randoms=3, generations=5, repair=repair)
    res = EvolutionarySearch(sp, ToyFitness(), cc, budget, cfg, progress=False).run()
    assert all(r.bitops <= budget for r in res.records)
    assert res.best.bitops <= budget
    bits = [r.bitops for r in res.pareto]
    assert bits == sorted(bits) and [r.value for r in res.pareto] == sorted((r.value for r in res.pareto), reverse=True)


def test_repair_lands_within_budget_or_says_minimum():
    sp = space()
    cc = cost_of(sp)
    sens = {n: {"w": {2: 9.0, 4: 1.0, 8: 0.0}, "a": {4: 1.0, 8: 0.0}} for n in NAMES}
    sens["u3"]["w"] = {2: 0.01, 4: 0.001, 8: 0.0}  # u3 barely cares: it should lose bits first
    rep = Repairer(cc, sens)
    full = sp.candidate(TARGET, sp.uniform_bits(8, 8))
    for budget in (cc.uniform_bitops(8, 8, 4) - 1, cc.uniform_bitops(4, 8, 4), cc.min_bitops()):
        fixed = rep.repair(full, budget)
        assert fixed is not None and cc.bitops(fixed) <= budget and fixed.timesteps == full.timesteps
    first = rep.repair(full, cc.uniform_bitops(8, 8, 4) - 1)
    assert first.bits[0][3][0] < 8 and first.bits[0][1] == (8, 8)
    assert rep.repair(full, cc.min_bitops() - 1) is None
    with pytest.raises(TmpqError, match="cheapest candidate"):
        EvolutionarySearch(sp, ToyFitness(), cc, cc.min_bitops() - 1, EvolutionConfig(repair=True))


def test_killed_search_resumes_to_the_same_end(tmp_path):
    sp = space(phase_bounds=(30,))
    cc = cost_of(sp)
    budget = cc.uniform_bitops(4, 8, 4)
    cfg = EvolutionConfig(population=16, parents=4, mutations=6, crossovers=3, randoms=3, generations=6, repair=True)
    full = EvolutionarySearch(sp, ToyFitness(), cc, budget, cfg, tmp_path / "a.json", progress=False).run()

    state = tmp_path / "b.json"
    for stop in (7, 23, 41):  # killed three times, mid-generation
        with pytest.raises(KeyboardInterrupt):
            EvolutionarySearch(sp, ToyFitness(stop_after=stop), cc, budget, cfg, state, progress=False).run()
    fit = ToyFitness()
    resumed = EvolutionarySearch(sp, fit, cc, budget, cfg, state, progress=False).run()
    assert resumed.best.candidate == full.best.candidate
    assert [r.candidate.key for r in resumed.records] == [r.candidate.key for r in full.records]
    timing = ("wall_s", "evals_per_min", "utilisation")  # measurements, not results

    def strip(history):
        return [{k: v for k, v in h.items() if k not in timing} for h in history]

    assert strip(resumed.history) == strip(full.history)
    assert len(fit.calls) < len(full.records)  # evaluations done before the kills were not redone
    assert json.loads(state.read_text())["done"] is True


def test_resume_with_other_settings_refused(tmp_path):
    sp = space()
    cc = cost_of(sp)
    budget = cc.uniform_bitops(8, 8, 4)
    cfg = EvolutionConfig(population=8, parents=2, mutations=3, crossovers=2, randoms=1, generations=2, repair=False)
    EvolutionarySearch(sp, ToyFitness(), cc, budget, cfg, tmp_path / "s.json", progress=False).run()
    with pytest.raises(TmpqError, match="another search config"):
        EvolutionarySearch(sp, ToyFitness(), cc, budget - 1, cfg, tmp_path / "s.json", progress=False).run()


def test_multi_objective_returns_non_dominated_front():
    sp = space()
    cc = cost_of(sp)
    cfg = EvolutionConfig(
        population=20,
        parents=6,
        mutations=8,
        crossovers=4,
        randoms=2,
        generations=6,
        multi_objective=True,
        repair=False,
    )
    res = EvolutionarySearch(sp, ToyFitness(), cc, cc.uniform_bitops(8, 8, 4), cfg, progress=False).run()
    assert len(res.pareto) >= 3
    for p in res.pareto:
        assert not any(
            r.value <= p.value and r.bitops <= p.bitops and (r.value, r.bitops) != (p.value, p.bitops)
            for r in res.records
        )
    assert pareto_front(res.records) == res.pareto


def test_ask_tell_by_hand_equals_run_and_callbacks_see_every_step(tmp_path):
    """The loop is ask → evaluate → tell → advance; driving it by hand gives run()'s result, and a callback
    sees each evaluation and generation (what progress, logging and checkpoints hang on)."""
    from tmpq.search.evolution import SearchCallback, SearchState

    sp = space()
    cc = cost_of(sp)
    budget = cc.uniform_bitops(4, 8, 4)
    cfg = EvolutionConfig(population=10, parents=3, mutations=4, crossovers=2, randoms=2, generations=4, seed=3)

    class Log(SearchCallback):
        def __init__(self) -> None:
            self.records, self.generations = 0, []

        def on_record(self, state, record) -> None:
            self.records += 1

        def on_generation(self, state, entry) -> None:
            self.generations.append(entry["generation"])

    log = Log()
    auto = EvolutionarySearch(sp, ToyFitness(), cc, budget, cfg, tmp_path / "s.json", progress=False).run(
        callbacks=[log]
    )
    search, fit = EvolutionarySearch(sp, ToyFitness(), cc, budget, cfg, progress=False), ToyFitness()
    state = search.start()
    while not state.done:
        for c in search.ask(state):
            search.tell(state, c, fit(c), 0.0)
        search.advance(state)
    by_hand = search.result(state)
    assert [r.candidate.key for r in by_hand.records] == [r.candidate.key for r in auto.records]
    assert by_hand.best.candidate == auto.best.candidate
    assert log.records == len(auto.records) and log.generations == list(range(cfg.generations))
    saved = json.loads((tmp_path / "s.json").read_text())
    assert SearchState.from_dict(saved).to_dict() == saved  # the checkpoint round-trips
    with pytest.raises(TmpqError, match="before every asked candidate"):
        fresh = search.start(resume=False)
        search.advance(fresh)
