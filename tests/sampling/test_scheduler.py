"""SearchedDDIMScheduler: diffusers' scheduler interface over a searched timestep list, tmpq's DDIM update."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from tmpq.errors import TmpqError
from tmpq.sampling.ddim import DDIMSampler
from tmpq.sampling.scheduler import SearchedDDIMScheduler
from tmpq.sampling.schedules import NoiseSchedule, uniform_timesteps


def test_equals_diffusers_ddim_on_a_uniform_list():
    schedule = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    ours = SearchedDDIMScheduler.from_searched(schedule, uniform_timesteps(10))
    ref = DDIMScheduler.from_config(dict(ours.config))
    ref.set_timesteps(10)
    ours.set_timesteps(50)  # a pipeline's num_inference_steps is ignored: the searched list runs
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    y = x.clone()
    for t in ref.timesteps:
        eps = torch.randn(2, 4, 8, 8, generator=g)
        x = ours.step(eps, t, x).prev_sample
        y = ref.step(eps, t, y).prev_sample
    assert torch.allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_any_list_steps_like_tmpq_ddim(prediction_type):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    ts = [911, 640, 333, 329, 40, 3]
    sched = SearchedDDIMScheduler.from_searched(schedule, ts)
    ddim = DDIMSampler(schedule, ts)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        out = torch.randn(3, 1, 8, 8, generator=g)
        eps = schedule.to_epsilon(out, x, torch.full((3,), int(t)))
        prev, _ = sched.step(out, t, x, return_dict=False)
        assert torch.equal(prev, ddim.step(eps, i, x).prev_sample)
        x = prev
    with pytest.raises(TmpqError, match="not one of the searched"):
        sched.step(out, 500, x)


def test_eta_draws_noise_from_the_generator():
    sched = SearchedDDIMScheduler.from_searched(NoiseSchedule(), [700, 300, 0])
    x, eps = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    a = sched.step(eps, 700, x, eta=1.0, generator=torch.Generator().manual_seed(0)).prev_sample
    b = sched.step(eps, 700, x, eta=1.0, generator=torch.Generator().manual_seed(0)).prev_sample
    c = sched.step(eps, 700, x, eta=0.0).prev_sample
    assert torch.equal(a, b) and not torch.equal(a, c)
