"""Parallel candidate evaluation: same results for any number of workers, no evaluation lost or duplicated
when a worker dies or hangs, Ray when installed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import toy_workers
from toy_workers import MACS, make_toy, toy_value  # tests/helpers, see its docstring

from tmpq.errors import TmpqError
from tmpq.quant.cost import CostModel, UnitCost
from tmpq.search.budget import CandidateCost
from tmpq.search.evolution import EvolutionarySearch, EvolutionConfig
from tmpq.search.parallel import Execution, ProcessEvaluator, SerialEvaluator, WorkerSpec
from tmpq.search.space import SearchSpace

NAMES = ("u0", "u1", "u2", "u3")


def space() -> SearchSpace:
    return SearchSpace(NAMES, ((2, 4, 8),) * 4, ((4, 8),) * 4, num_train_timesteps=60, steps=(4,))


def cost_of(sp: SearchSpace) -> CandidateCost:
    return CandidateCost(sp, CostModel({n: UnitCost("conv", m, 10, 0) for n, m in zip(NAMES, MACS)}))


def candidates(n: int):
    sp, rng = space(), random.Random(0)
    out = {}
    while len(out) < n:
        c = sp.random(rng)
        out[c.key] = c
    return list(out.values())


def spec(**kw) -> WorkerSpec:
    return WorkerSpec("toy_workers:make_toy", kw)


def test_process_workers_match_serial():
    cands = candidates(6)
    serial = {c.key: fv.value for c, fv, _ in SerialEvaluator(make_toy()).evaluate(cands)}
    ev = ProcessEvaluator(spec(), workers=2)
    try:
        par = {c.key: fv.value for c, fv, _ in ev.evaluate(cands)}
    finally:
        ev.close()
    assert par == serial and len(par) == 6


@pytest.mark.parametrize("fault", ["die", "hang"])
def test_dead_or_hung_worker_loses_and_duplicates_nothing(fault, tmp_path):
    cands = candidates(5)
    log = tmp_path / "log"
    ev = ProcessEvaluator(spec(fault=fault, marker=str(tmp_path / "marker"), log=str(log)), workers=2, timeout_s=10)
    try:
        got = [c.key for c, _, _ in ev.evaluate(cands)]
    finally:
        ev.close()
    assert sorted(got) == sorted(c.key for c in cands)  # each candidate yielded exactly once
    assert sorted(log.read_text().split()) == sorted(got)  # ... and evaluated to completion exactly once
    assert ev.restarts >= 1


def test_candidate_that_always_kills_its_worker_stops_with_a_clear_error(tmp_path):
    ev = ProcessEvaluator(WorkerSpec("toy_workers:no_such_factory"), workers=1, max_attempts=2)
    with pytest.raises(TmpqError, match="failed 2 times"):
        list(ev.evaluate(candidates(1)))
    ev.close()


def _search(evaluator):
    sp = space()
    cc = cost_of(sp)
    cfg = EvolutionConfig(
        population=8, parents=3, mutations=4, crossovers=2, randoms=1, generations=3, seed=1, repair=False
    )
    return EvolutionarySearch(sp, make_toy(), cc, cc.uniform_bitops(8, 8, 4), cfg, progress=False, evaluator=evaluator)


def _strip(history):
    keep = ("generation", "best_value", "best_bitops", "best_key", "evaluated", "forwards")
    return [{k: h[k] for k in keep} for h in history]


def test_search_result_does_not_depend_on_worker_count():
    serial = _search(None).run(resume=False)
    one = _search(ProcessEvaluator(spec(), workers=1)).run(resume=False)
    two = _search(ProcessEvaluator(spec(), workers=2)).run(resume=False)
    for res in (one, two):
        assert _strip(res.history) == _strip(serial.history)
        assert {r.candidate.key: r.value for r in res.records} == {r.candidate.key: r.value for r in serial.records}
        assert res.best.candidate == serial.best.candidate
    assert two.history[-1]["workers"] == 2 and 0 < two.history[-1]["utilisation"] <= 1.0
    assert serial.best.value == min(toy_value(r.candidate) for r in serial.records if r.bitops <= serial.budget)


def test_execution_rejects_bad_values():
    with pytest.raises(TmpqError):
        Execution(workers=-1)
    with pytest.raises(TmpqError):
        Execution(timeout_s=0)


def test_ray_workers_match_serial_and_survive_a_dead_actor(tmp_path):
    ray = pytest.importorskip("ray")
    from tmpq.search.parallel import RayEvaluator

    cands = candidates(5)
    serial = {c.key: fv.value for c, fv, _ in SerialEvaluator(make_toy()).evaluate(cands)}
    helpers = str(Path(toy_workers.__file__).parent)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": helpers}},
    )
    try:
        log = tmp_path / "log"
        ev = RayEvaluator(spec(fault="die", marker=str(tmp_path / "m"), log=str(log)), workers=2)
        got = {c.key: fv.value for c, fv, _ in ev.evaluate(cands)}
        ev.close()
        assert got == serial
        assert sorted(log.read_text().split()) == sorted(serial) and ev.restarts == 1
    finally:
        ray.shutdown()


def test_run_search_with_two_workers_equals_one(tmp_path):
    """The real fitness in spawned workers, rebuilt from the run directory: same search either way."""
    from tmpq.models.loading import load_model
    from tmpq.quant import CalibConfig, QuantSpec
    from tmpq.search import Budget, FitnessConfig, SearchConfig, run_search

    model = tmp_path / "m.safetensors"
    _save_tiny(model)
    cfg = SearchConfig(
        lever="joint",
        budget=Budget.like("W8A8", 3),
        steps=(3,),
        evolution=EvolutionConfig.tmpq(generations=2, population=4, parents=2, mutations=2, crossovers=1, randoms=1),
        final_samples=0,
        fitness=FitnessConfig("proxy", num_samples=4),
        calib=CalibConfig(2, 3),
        quant=QuantSpec(w_bits=(4, 8), a_bits=(8,), reconstruction=None),
    )
    results = []
    for n in (1, 2):
        res = run_search(
            load_model(str(model)), cfg, tmp_path / f"run{n}", progress=False, execution=Execution(workers=n)
        )
        results.append(res)
    a, b = results
    assert _strip(a.history) == _strip(b.history) and a.best.candidate == b.best.candidate
    assert {r.candidate.key: r.value for r in a.records} == {r.candidate.key: r.value for r in b.records}


def _save_tiny(path):
    import shutil

    from tmpq.models.train import TrainConfig, train_ddpm

    images = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = TrainConfig(steps=1, batch_size=8, block_out_channels=(8, 16), warmup_steps=1, autocast="off")
    shutil.copyfile(train_ddpm(images, path.parent / "train", cfg, progress=False), path)
