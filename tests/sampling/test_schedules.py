from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from tmpq.errors import TmpqError
from tmpq.sampling.schedules import NoiseSchedule, make_timesteps, quad_timesteps, uniform_timesteps, validate_timesteps


def test_alphas_match_diffusers():
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod
    assert torch.equal(NoiseSchedule().alphas_cumprod, ref)


def test_uniform_and_quad_shapes():
    assert uniform_timesteps(10) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    q = quad_timesteps(10)
    assert len(q) == 10 and q[0] == 800 and q[-1] == 0
    gaps = [a - b for a, b in zip(q, q[1:])]
    assert gaps == sorted(gaps, reverse=True)  # dense near t = 0


@pytest.mark.parametrize(
    ("ts", "msg"),
    [
        ([], "empty"),
        ([5, 10], "strictly decreasing"),
        ([10, 10, 3], "more than once"),
        ([1000, 3], "outside"),
        ([5, -1], "outside"),
        ([5.5, 1], "not an integer"),
    ],
)
def test_bad_schedules_get_clear_errors(ts, msg):
    with pytest.raises(TmpqError, match=msg):
        validate_timesteps(ts, 1000)


def test_bad_schedule_kind_and_step_count():
    with pytest.raises(TmpqError, match="unknown schedule"):
        make_timesteps("cosine", 10)
    with pytest.raises(TmpqError, match="number of steps"):
        make_timesteps("uniform", 0)
    assert quad_timesteps(1000) == list(range(999, -1, -1))


def test_quad_with_many_steps_stays_strictly_decreasing():
    q = quad_timesteps(100)
    assert len(q) == 100 and q[0] == 800 and q[-1] == 0
    assert validate_timesteps(q, 1000) == q
    assert quad_timesteps(10) == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]  # unchanged where no repeats
