"""Flow-matching schedules: tmpq's integer timesteps index FlowMatchEulerDiscreteScheduler's own sigmas, and DDIM on a
flow schedule is its Euler step, equal to the diffusers scheduler on its own schedules."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tmpq.errors import TmpqError
from tmpq.sampling.ddim import DDIMSampler
from tmpq.sampling.schedules import FlowSchedule, NoiseSchedule, is_flow_config, schedule_from_dict


class ToyVelocity(torch.nn.Module):
    """A nonlinear velocity field of (x, σ·T): what a flow transformer is called with."""

    def __init__(self, schedule: FlowSchedule) -> None:
        super().__init__()
        self.schedule = schedule

    def field(self, x: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        s = (model_t / 1000).reshape(-1, 1, 1, 1)
        return torch.tanh(1.5 * x) * (0.5 + s) - 0.3 * x.flip(-1) * s

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.field(x, self.schedule.model_timestep(t))


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [2, 4, 10, 28])
def test_diffusers_schedules_are_subsets_of_the_grid_and_sampling_equals_theirs(shift, steps):
    schedule = FlowSchedule(shift=shift)
    theirs = FlowMatchEulerDiscreteScheduler(shift=shift)
    theirs.set_timesteps(steps)
    ks = schedule.timesteps("uniform", steps)
    assert ks[0] == 999 and ks[-1] == 0 and len(ks) == steps
    assert torch.allclose(schedule.sigmas[ks], theirs.sigmas[:-1], rtol=0, atol=1e-6)
    model = ToyVelocity(schedule)
    x0 = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    mine = DDIMSampler(schedule, ks).sample(model, x0.clone())
    x = x0.clone()
    for t in theirs.timesteps:
        x = theirs.step(model.field(x, t.expand(len(x))), t, x).prev_sample
    assert torch.allclose(mine, x, atol=1e-5)


def test_flow_schedule_round_trips_noises_and_refuses_what_it_cannot_run():
    schedule = FlowSchedule(shift=3.0)
    assert schedule_from_dict(schedule.to_dict()) == schedule
    assert schedule_from_dict(NoiseSchedule().to_dict()) == NoiseSchedule()  # files without a kind: DDPM
    x0, noise = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    t = torch.tensor([0, 999])
    xt = schedule.add_noise(x0, noise, t)
    assert torch.allclose(xt[1], torch.zeros(1, 2, 2)) and torch.allclose(xt[0], x0[0] * (1 - schedule.sigmas[0]))
    assert float(schedule.alphas_cumprod[-1]) == 0.0 and float(schedule.alphas_cumprod[0]) > 0.99
    cfg = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert is_flow_config(cfg) and not is_flow_config({"beta_start": 1e-4, "num_train_timesteps": 1000})
    assert FlowSchedule.from_scheduler_config(cfg) == schedule
    with pytest.raises(TmpqError, match="use_dynamic_shifting"):
        FlowSchedule.from_scheduler_config(cfg | {"use_dynamic_shifting": True})
    with pytest.raises(TmpqError, match="eta = 0"):
        DDIMSampler(schedule, [999, 0], eta=0.5)
    assert schedule.timesteps("quad", 5)[0] == 999 and schedule.timesteps("quad", 5)[-1] == 0
