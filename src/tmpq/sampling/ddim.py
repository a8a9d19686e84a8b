"""DDIM over any strictly decreasing timestep list.

diffusers' DDIMScheduler only spaces timesteps by rule; the joint search needs arbitrary lists,
so this sampler takes the list itself. Each step goes from the current timestep to the next one
in the list (the last step goes to alpha = 1, like `set_alpha_to_one=True`), which makes it equal
to DDIMScheduler whenever the list is one DDIMScheduler would produce.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tmpq.device import default_batch_size, module_device
from tmpq.errors import TmpqError
from tmpq.sampling.conditioning import Conditioning, call_denoiser
from tmpq.sampling.schedules import FlowSchedule, NoiseSchedule, validate_timesteps

Denoiser = Callable[..., torch.Tensor]
"""Anything called as `eps = model(x_t, t)` with t a (B,) integer tensor, or `model(x_t, t, cond)` when conditional
(`cond` a `Conditioning`: prompt ids and their embeddings)."""


@dataclass(frozen=True)
class DDIMStepOutput:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class DDIMSampler:
    """Deterministic (eta = 0) or stochastic DDIM for epsilon-prediction models; on a `FlowSchedule`, Euler on the
    flow ODE (the same update in flow coordinates)."""

    def __init__(
        self,
        schedule: NoiseSchedule | FlowSchedule,
        timesteps: Sequence[int],
        eta: float = 0.0,
        clip_sample: bool | None = None,
        clip_sample_range: float | None = None,
        use_clipped_model_output: bool = False,
    ) -> None:
        if not (math.isfinite(eta) and eta >= 0):
            raise TmpqError(f"eta must be a number >= 0, got {eta}")
        if eta > 0 and schedule.prediction_type == "flow":
            raise TmpqError("a flow-matching schedule samples deterministically (Euler); use eta = 0")
        self.schedule = schedule
        self.timesteps = validate_timesteps(timesteps, schedule.num_train_timesteps)
        self.eta = float(eta)
        # None: what the model's scheduler config declares (latent models do not clip)
        self.clip_sample = schedule.clip_sample if clip_sample is None else clip_sample
        self.clip_sample_range = schedule.clip_sample_range if clip_sample_range is None else clip_sample_range
        self.use_clipped_model_output = use_clipped_model_output

    def __len__(self) -> int:
        return len(self.timesteps)

    def _alpha(self, t: int) -> torch.Tensor:
        return self.schedule.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0)

    def _flow_step(self, v: torch.Tensor, index: int, sample: torch.Tensor) -> DDIMStepOutput:
        """DDIM in flow coordinates: the Euler step x' = x + (σ' − σ) v (the last step goes to σ = 0), with
        FlowMatchEulerDiscreteScheduler's arithmetic; x_0 = x − σ v."""
        sigmas = self.schedule.sigmas
        s = sigmas[self.timesteps[index]].to(sample.device)
        s_next = sigmas[self.timesteps[index + 1]].to(sample.device) if index + 1 < len(self.timesteps) else 0.0
        x = sample.float()
        return DDIMStepOutput(prev_sample=x + (s_next - s) * v.float(), pred_original_sample=x - s * v.float())

    def step(
        self,
        eps: torch.Tensor,
        index: int,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> DDIMStepOutput:
        """One DDIM update from timesteps[index] to timesteps[index + 1] (or to x_0 after the last). `eps` is the
        model's ε prediction, or its velocity on a flow-matching schedule."""
        if self.schedule.prediction_type == "flow":
            return self._flow_step(eps, index, sample)
        t = self.timesteps[index]
        t_prev = self.timesteps[index + 1] if index + 1 < len(self.timesteps) else -1
        a_t, a_prev = self._alpha(t).to(sample.device), self._alpha(t_prev).to(sample.device)
        x0 = (sample - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
            if self.use_clipped_model_output:  # DDIMScheduler's option of the same name
                eps = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * variance.clamp(min=0).sqrt()
        direction = (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
        prev = a_prev.sqrt() * x0 + direction
        if self.eta > 0:
            if noise is None:
                raise TmpqError("eta > 0 needs step noise; pass `noise` (the sampler loop does this from the seeds)")
            prev = prev + std * noise
        return DDIMStepOutput(prev_sample=prev, pred_original_sample=x0)

    @torch.no_grad()
    def sample(
        self,
        model: Denoiser,
        x_T: torch.Tensor,
        generators: Sequence[torch.Generator] | None = None,
        progress: bool = False,
        cond: Conditioning | None = None,
    ) -> torch.Tensor:
        """Run the reverse process from x_T; `generators` (one per sample) draw eta > 0 noise; `cond` (one entry
        per sample) conditions a conditional denoiser."""
        x = x_T
        for i, t in enumerate(tqdm(self.timesteps, desc="ddim", disable=not progress, leave=False)):
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            eps = call_denoiser(model, x, tt, cond)
            if not torch.isfinite(eps).all():
                raise TmpqError(
                    f"the denoiser returned NaN/inf at timestep {t}; the model or its quantization is broken "
                    "(check the weights, or use more bits)"
                )
            noise = None
            if self.eta > 0:
                noise = per_sample_noise(generators, x.shape[1:], x.device)
            x = self.step(eps, i, x, noise).prev_sample
        return x


def per_sample_noise(
    generators: Sequence[torch.Generator] | None, shape: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One N(0, I) draw per generator, stacked: sample i depends only on its own seed, not the batch."""
    if not generators:
        raise TmpqError("per-sample noise needs one torch.Generator per sample")
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def generate(
    model: Denoiser,
    sampler: DDIMSampler,
    num_samples: int,
    shape: Sequence[int],
    seed: int = 0,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    cond: Conditioning | None = None,
) -> torch.Tensor:
    """Sample `num_samples` images (returned on the CPU); sample i uses seed `seed + i` (and `cond` entry i), so the
    batch size changes only float rounding. `device`: where the noise is made, by default the model's; `batch_size`:
    by default what suits that device (`tmpq.device.default_batch_size`)."""
    device = module_device(model) if device is None else torch.device(device)
    batch_size = batch_size or default_batch_size(device)
    if num_samples < 1:
        raise TmpqError(f"num_samples must be >= 1, got {num_samples}")
    if cond is not None and len(cond) != num_samples:
        raise TmpqError(f"{len(cond)} conditioning entries for {num_samples} samples; give one per sample")
    out = []
    bar = tqdm(total=num_samples, desc=f"sample ({len(sampler)} steps)", disable=not progress, dynamic_ncols=True)
    for start in range(0, num_samples, batch_size):
        seeds = range(seed + start, seed + min(start + batch_size, num_samples))
        gens = seed_generators(seeds)
        x_T = per_sample_noise(gens, shape, device)
        c = None if cond is None else cond.select(start, start + len(seeds))
        out.append(sampler.sample(model, x_T, gens, cond=c).cpu())
        bar.update(len(seeds))
    bar.close()
    return torch.cat(out)
