from __future__ import annotations

import random

import pytest

from tmpq.errors import TmpqError
from tmpq.sampling.schedules import quad_timesteps, uniform_timesteps
from tmpq.search.space import SearchSpace, group_starts


def toy_space(**kw) -> SearchSpace:
    names = ("a", "b", "c")
    return SearchSpace(names, ((2, 4, 8), (4, 8), (None,)), ((4, 8), (4, 8), (6, 8)), **kw)


def test_quad_grouping_starts_are_the_quad_schedule():
    sp = toy_space(steps=(10,))
    assert sp.default_timesteps(10) == tuple(quad_timesteps(10))
    assert toy_space(grouping="uniform").default_timesteps(10) == tuple(uniform_timesteps(10))
    groups = sp.groups(10)
    assert groups[0][0] == 0 and groups[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))  # contiguous cover of [0, T)
    widths = [hi - lo for lo, hi in groups]
    assert widths[0] < widths[-2]  # quad: short groups near t = 0


def test_change_grouping_follows_the_profile():
    change = [10.0 if t < 100 else 0.1 for t in range(1000)]
    starts = group_starts("change", 5, 1000, change)
    assert starts[0] == 0 and len(set(starts)) == 5
    assert sum(1 for s in starts if s < 100) >= 4  # most groups where the output changes fastest
    with pytest.raises(TmpqError, match="change profile"):
        group_starts("change", 5, 1000, None)


@pytest.mark.parametrize("steps", [(10,), (6, 8, 10, 12)])
def test_operators_keep_genes_in_groups_and_schedules_decreasing(steps):
    sp = toy_space(steps=steps, phase_bounds=(500,))
    rng = random.Random(0)
    pop = [sp.random(rng) for _ in range(20)]
    for _ in range(300):
        a, b = rng.choice(pop), rng.choice(pop)
        child = sp.mutate(a, rng, 0.5) if rng.random() < 0.5 else sp.crossover(a, b, rng)
        sp.validate(child)  # every timestep inside its group, bits inside their choices
        assert all(x > y for x, y in zip(child.timesteps, child.timesteps[1:]))
        pop.append(child)
    assert len({len(c.timesteps) for c in pop}) == len(steps)  # K really varies when allowed


def test_single_lever_spaces():
    fixed = toy_space().uniform_bits(4, 8)
    t_only = toy_space(search_bits=False, fixed_bits=fixed)
    b_only = toy_space(search_timesteps=False)
    rng = random.Random(1)
    for _ in range(50):
        assert t_only.random(rng).bits == (fixed,)
        c = b_only.mutate(b_only.random(rng), rng, 1.0)
        assert c.timesteps == b_only.default_timesteps(10)
    with pytest.raises(TmpqError, match="fixed_bits"):
        toy_space(search_bits=False)


def test_phases_and_validation_errors():
    sp = toy_space(phase_bounds=(500,))
    assert sp.num_phases == 2 and sp.phase_of(900) == 0 and sp.phase_of(10) == 1
    c = sp.candidate(sp.default_timesteps(10), sp.uniform_bits(8, 8))
    assert len(c.bits) == 2
    configs = sp.step_configs(c)
    assert [t for t, _ in configs] == list(c.timesteps)
    with pytest.raises(TmpqError, match="outside its group"):
        sp.candidate((800, 500, *c.timesteps[2:]), sp.uniform_bits(8, 8))  # 500 is not in [632, 800)
    with pytest.raises(TmpqError, match="steps"):
        sp.candidate((900, 0), sp.uniform_bits(8, 8))
    with pytest.raises(TmpqError, match="cannot take"):
        sp.uniform_bits(3, 8)
