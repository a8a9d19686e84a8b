from __future__ import annotations

import json
import shutil

import pytest
from tiny_search import tiny_loaded as _loaded
from tiny_search import tiny_search_config as _cfg

from tmpq.errors import TmpqError
from tmpq.quant.config import QuantConfig
from tmpq.search import Record, RunSummary, SearchConfig, run_search
from tmpq.search.seeds import seed_candidates
from tmpq.search.space import Candidate, SearchSpace

UNITS = ("a", "b", "c")


def _space(**kw) -> SearchSpace:
    return SearchSpace(UNITS, ((4, 6, 8),) * 3, ((6, 8),) * 3, steps=(4,), grouping="uniform", **kw)


def _write_seed(path, timesteps, phases: list[dict], bounds=()):
    """A finished search whose best has these timesteps and per-phase bits (only what seeding reads is real)."""
    configs = tuple(QuantConfig.from_mapping({n: tuple(wa) for n, wa in b.items()}) for b in phases)
    cand = Candidate(tuple(timesteps), tuple(tuple(q.as_dict().values()) for q in configs))
    best = Record(cand, 1.0, 1, 1, 0.0, 0)
    summary = RunSummary(best, configs, 1, "W6A6@4", 10, SearchConfig(phase_bounds=tuple(bounds)), "builtin:fashion")
    summary.write(path)
    return path


ALLOC = {"a": [4, 6], "b": [8, 8], "c": [6, 6]}


def test_seeds_combine_schedules_and_allocations(tmp_path):
    space = _space()
    default = space.uniform_bits(6, 6)
    seed = _write_seed(tmp_path / "s", [800, 510, 260, 10], [ALLOC])  # inside the uniform groups for K=4
    got = seed_candidates([seed], space, default)
    alloc = ((4, 6), (8, 8), (6, 6))
    keys = [(c.timesteps, c.bits) for c in got]
    assert keys == [
        ((800, 510, 260, 10), (alloc,)),
        ((800, 510, 260, 10), (default,)),
        (space.default_timesteps(4), (alloc,)),
        (space.default_timesteps(4), (default,)),
    ]


def test_a_schedule_outside_the_groups_keeps_only_the_allocation(tmp_path):
    space = _space()
    seed = _write_seed(tmp_path / "s", [999, 998, 997, 0], [ALLOC])  # not one timestep per uniform group
    got = seed_candidates([seed], space, space.uniform_bits(6, 6))
    assert {c.timesteps for c in got} == {space.default_timesteps(4)}
    assert len(got) == 2


def test_phases_are_mapped_by_timestep(tmp_path):
    two = _space(phase_bounds=(500,))
    low = {"a": [8, 8], "b": [8, 8], "c": [8, 8]}
    one_phase = _write_seed(tmp_path / "one", [750, 500, 250, 0], [ALLOC])
    got = seed_candidates([one_phase], two, None)
    assert got[0].bits == (((4, 6), (8, 8), (6, 6)),) * 2  # one allocation fills every phase
    two_phase = _write_seed(tmp_path / "two", [750, 500, 250, 0], [ALLOC, low], bounds=(500,))
    got = seed_candidates([two_phase], _space(), None)
    assert got[0].bits == (((8, 8),) * 3,)  # a one-phase space takes the seed's phase holding t = 0


def test_bad_seeds_get_clear_errors(tmp_path):
    space = _space()
    with pytest.raises(TmpqError, match="no finished search"):
        seed_candidates([tmp_path / "missing"], space, None)
    other = _write_seed(tmp_path / "other", [750, 500, 250, 0], [{"x": [8, 8]}])
    with pytest.raises(TmpqError, match="another model"):
        seed_candidates([other], space, None)
    narrow = _write_seed(tmp_path / "narrow", [800, 510, 260, 10], [{"a": [2, 6], "b": [8, 8], "c": [6, 6]}])
    assert {c.timesteps for c in seed_candidates([narrow], space, space.uniform_bits(6, 6))} == {
        (800, 510, 260, 10),
        space.default_timesteps(4),
    }  # a schedule that fits is used even when the seed's bits are outside this space's choices
    wide = _write_seed(tmp_path / "wide", [999, 998, 997, 0], [{"a": [2, 6], "b": [8, 8], "c": [6, 6]}])
    with pytest.raises(TmpqError, match="fits neither"):
        seed_candidates([wide], space, None)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "search.json").write_text("{}")
    with pytest.raises(TmpqError, match="not a tmpq search result"):
        seed_candidates([tmp_path / "junk"], space, None)


def test_joint_search_seeded_with_single_lever_winners(make_tiny_unet, tmp_path):
    """The seeded joint search scores both winners and their combination in its first generation, on the same
    fitness, so its best can be no worse than either single-lever search's; a resume needs the seeds no more."""
    bits = run_search(_loaded(make_tiny_unet), _cfg(lever="bits"), tmp_path / "bits", progress=False)
    ts_cfg = _cfg(lever="timesteps", fixed_precision="W6A6")
    ts = run_search(_loaded(make_tiny_unet), ts_cfg, tmp_path / "ts", progress=False)
    cfg = _cfg(seed_from=(str(tmp_path / "bits"), str(tmp_path / "ts")))
    joint = run_search(_loaded(make_tiny_unet), cfg, tmp_path / "joint", progress=False)
    first = {r.candidate.key for r in joint.records if r.generation == 0}
    combo = bits.best.candidate.__class__(ts.best.candidate.timesteps, bits.best.candidate.bits)
    assert {combo.key, bits.best.candidate.key, ts.best.candidate.key} <= first
    assert joint.best.value <= min(bits.best.value, ts.best.value)
    assert joint.best.bitops <= joint.budget
    shutil.rmtree(tmp_path / "bits")  # resuming (here: re-running a finished search) no longer reads the seeds
    again = run_search(_loaded(make_tiny_unet), cfg, tmp_path / "joint", progress=False)
    assert again.best.candidate == joint.best.candidate


def test_staged_search_runs_both_levers_then_the_seeded_joint(make_tiny_unet, tmp_path):
    cfg = _cfg(staged=True)
    res = run_search(_loaded(make_tiny_unet), cfg, tmp_path, progress=False)
    stages = {n: json.loads((tmp_path / "stages" / n / "search.json").read_text()) for n in ("bits", "timesteps")}
    assert stages["bits"]["config"]["lever"] == "bits" and stages["timesteps"]["config"]["lever"] == "timesteps"
    assert stages["timesteps"]["config"]["fixed_precision"] == "W6A6"  # the budget's own precision
    assert res.best.value <= min(s["best"]["value"] for s in stages.values())
    out = json.loads((tmp_path / "search.json").read_text())
    assert [s["run_dir"] for s in out["seed_searches"]] == [str(tmp_path / "stages" / n) for n in ("bits", "timesteps")]
    assert all(s["search_cost"]["evaluations"] > 0 for s in out["seed_searches"])
    # calibration, sensitivity and proxy reference are made once, by the first stage, and lent to the rest
    assert stages["bits"]["search_cost"]["overhead_forwards"] > 0
    assert stages["timesteps"]["search_cost"]["overhead_forwards"] == 0 == out["search_cost"]["overhead_forwards"]
    assert out["config"]["staged"] and not (tmp_path / "stages" / "bits" / "final.json").exists()
    shutil.rmtree(tmp_path / "stages")  # a finished (or resumed) staged search does not run its stages again
    again = run_search(_loaded(make_tiny_unet), cfg, tmp_path, progress=False)
    assert again.best.candidate == res.best.candidate and not (tmp_path / "stages").exists()
    with pytest.raises(TmpqError, match="staged search ends in a joint"):
        _cfg(staged=True, lever="bits")
