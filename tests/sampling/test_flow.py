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


def assert_samples_as_scheduler(schedule: FlowSchedule, ks: list[int], theirs: FlowMatchEulerDiscreteScheduler):
    """DDIMSampler on tmpq's timesteps `ks` and the diffusers scheduler on its own ones give the same samples."""
    model = ToyVelocity(schedule)
    x0 = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    mine = DDIMSampler(schedule, ks).sample(model, x0.clone())
    x = x0.clone()
    for t in theirs.timesteps:
        x = theirs.step(model.field(x, t.expand(len(x))), t, x).prev_sample
    assert torch.allclose(mine, x, atol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [2, 4, 10, 28])
def test_diffusers_schedules_are_subsets_of_the_grid_and_sampling_equals_theirs(shift, steps):
    schedule = FlowSchedule(shift=shift)
    theirs = FlowMatchEulerDiscreteScheduler(shift=shift)
    theirs.set_timesteps(steps)
    ks = schedule.timesteps("uniform", steps)
    assert ks[0] == 999 and ks[-1] == 0 and len(ks) == steps
    assert torch.allclose(schedule.sigmas[ks], theirs.sigmas[:-1], rtol=0, atol=1e-6)
    assert_samples_as_scheduler(schedule, ks, theirs)


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
    with pytest.raises(TmpqError, match="use_dynamic_shifting"):  # shifted by the image size, which is not given
        FlowSchedule.from_scheduler_config(cfg | {"use_dynamic_shifting": True})
    with pytest.raises(TmpqError, match="use_karras_sigmas"):
        FlowSchedule.from_scheduler_config(cfg | {"use_karras_sigmas": True})
    with pytest.raises(TmpqError, match="time_shift_type"):
        FlowSchedule.from_scheduler_config(cfg | {"use_dynamic_shifting": True, "time_shift_type": "linear"}, 64)
    with pytest.raises(TmpqError, match="spacing"):
        FlowSchedule(spacing="leading")
    with pytest.raises(TmpqError, match="eta = 0"):
        DDIMSampler(schedule, [999, 0], eta=0.5)
    assert schedule.timesteps("quad", 5)[0] == 999 and schedule.timesteps("quad", 5)[-1] == 0


FLUX_DEV = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
FLUX_DEV |= {"base_image_seq_len": 256, "max_image_seq_len": 4096}


@pytest.mark.parametrize("seq_len", [16, 1024, 4096])
@pytest.mark.parametrize("steps", [4, 10, 50])
def test_flux_dynamic_shift_and_trailing_spacing_equal_the_flux_pipeline_schedule(seq_len, steps):
    """FluxPipeline asks for sigmas linspace(1, 1/N, N) shifted by mu(image tokens): on tmpq's grid exactly when N
    divides T, and the Euler sampler over them equals the scheduler's."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    schedule = FlowSchedule.from_scheduler_config(FLUX_DEV, image_seq_len=seq_len, spacing="trailing")
    assert schedule.mu == pytest.approx(calculate_shift(seq_len)) and schedule.spacing == "trailing"
    assert schedule_from_dict(schedule.to_dict()) == schedule
    theirs = FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    theirs.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    ks = schedule.timesteps("uniform", steps)
    assert ks[0] == 999 and len(ks) == steps and ks[-1] == 1000 // steps - 1
    assert torch.allclose(schedule.sigmas[ks], theirs.sigmas[:-1].float(), rtol=0, atol=1e-6)
    assert_samples_as_scheduler(schedule, ks, theirs)
    fixed = FlowSchedule.from_scheduler_config({"shift": 1.0}, spacing="trailing")  # FLUX.1-schnell: no shift
    assert fixed.mu is None and fixed.timesteps("uniform", 4) == [999, 749, 499, 249]
    assert "mu" not in FlowSchedule(shift=3.0).to_dict()  # fixed-shift files (and fingerprints) are unchanged
