"""How fast the denoiser's output moves along t: the measurement behind the 'change' grouping."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tmpq.sampling.ddim import DDIMSampler, per_sample_noise, seed_generators
from tmpq.sampling.schedules import NoiseSchedule, uniform_timesteps


@torch.no_grad()
def change_profile(
    model: nn.Module,
    schedule: NoiseSchedule,
    sample_shape: Sequence[int],
    num_samples: int = 32,
    num_steps: int = 100,
    seed: int = 2_000_000,
) -> tuple[float, ...]:
    """Per training timestep, the mean squared change of ε̂ per unit of t along FP DDIM trajectories.

    Measured between consecutive steps of a `num_steps` uniform trajectory and spread evenly over the
    timesteps between them; costs num_samples × num_steps image-forwards.
    """
    T = schedule.num_train_timesteps
    ts = uniform_timesteps(num_steps, T)
    sampler = DDIMSampler(schedule, ts)
    x = per_sample_noise(seed_generators(range(seed, seed + num_samples)), sample_shape)
    eps_prev, t_prev = None, None
    rate = [0.0] * T
    for i, t in enumerate(ts):
        eps = model(x, torch.full((num_samples,), t, dtype=torch.long))
        if eps_prev is not None:
            r = float((eps - eps_prev).pow(2).mean()) / (t_prev - t)
            for s in range(t, t_prev):
                rate[s] = r
        eps_prev, t_prev = eps, t
        x = sampler.step(eps, i, x).prev_sample
    top = ts[0]
    tail = rate[top - 1] if top > 0 else 0.0  # above the first sampled step: extend the last measured rate
    out = [rate[s] if s < top else tail for s in range(T)]
    return tuple(out) if any(out) else (1.0,) * T
