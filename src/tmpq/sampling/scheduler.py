"""Diffusers schedulers that run tmpq's sampler on a searched, arbitrary timestep list: DDIM for noise schedules,
flow-matching Euler for flow schedules (`SearchedFlowMatchScheduler`, at the end).

diffusers' DDIMScheduler (0.42) spaces timesteps by rule and derives each step's previous timestep as
t − T/K, so it cannot run a searched list such as [800, 637, 483, 246, 229, …]. This subclass keeps
DDIMScheduler's config and interface (pipelines check `set_timesteps`' signature, read `timesteps`,
`init_noise_sigma`, `order`, call `scale_model_input` and `step`), but its steps are tmpq's own
`DDIMSampler.step` between consecutive entries of the list, so a pipeline and `CompressedSampler.sample`
compute the same update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from tmpq.errors import TmpqError
from tmpq.sampling.ddim import DDIMSampler
from tmpq.sampling.schedules import FlowSchedule, NoiseSchedule, validate_timesteps


class SearchedDDIMScheduler(DDIMScheduler):
    """DDIM over `searched_timesteps` whatever `num_inference_steps` a pipeline asks for (pipelines default to
    50 or 1000 steps; the compressed model's bits were chosen for these steps only)."""

    searched_timesteps: tuple[int, ...] = ()

    @classmethod
    def from_searched(cls, schedule: NoiseSchedule, timesteps: Sequence[int]) -> SearchedDDIMScheduler:
        sched = cls(
            num_train_timesteps=schedule.num_train_timesteps,
            beta_start=schedule.beta_start,
            beta_end=schedule.beta_end,
            beta_schedule=schedule.beta_schedule,
            prediction_type=schedule.prediction_type,
            clip_sample=schedule.clip_sample,
            clip_sample_range=schedule.clip_sample_range,
            set_alpha_to_one=True,  # tmpq's DDIM ends at alpha = 1
        )
        sched.searched_timesteps = validate_timesteps(timesteps, schedule.num_train_timesteps)
        sched.set_timesteps()
        return sched

    def _noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_scheduler_config(dict(self.config))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """Use the searched list (or an explicit `timesteps` list); `num_inference_steps` is ignored."""
        ts = list(timesteps) if timesteps is not None else self.searched_timesteps
        if not ts:
            raise TmpqError("no searched timesteps: build the scheduler with SearchedDDIMScheduler.from_searched")
        ts = validate_timesteps(ts, self.config.num_train_timesteps)
        self.num_inference_steps = len(ts)
        self.timesteps = torch.tensor(ts, dtype=torch.long, device=device)
        self._index = {t: i for i, t in enumerate(ts)}
        self._ddim = DDIMSampler(self._noise_schedule(), ts)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        t = int(timestep)
        if t not in self._index:
            raise TmpqError(f"timestep {t} is not one of the searched timesteps {list(self._index)}")
        if model_output.shape[1] == 2 * sample.shape[1]:  # learned variance: the mean half
            model_output = model_output[:, : sample.shape[1]]
        tt = torch.full((sample.shape[0],), t, dtype=torch.long, device=sample.device)
        eps = self._ddim.schedule.to_epsilon(model_output, sample, tt)
        ddim = self._ddim
        if eta != ddim.eta or use_clipped_model_output != ddim.use_clipped_model_output:
            clipped = use_clipped_model_output
            ddim = DDIMSampler(ddim.schedule, ddim.timesteps, eta=eta, use_clipped_model_output=clipped)
        noise = None
        if eta > 0:
            noise = variance_noise
            if noise is None:
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        out = ddim.step(eps, self._index[t], sample, noise)
        if not return_dict:
            return (out.prev_sample, out.pred_original_sample)
        return DDIMSchedulerOutput(prev_sample=out.prev_sample, pred_original_sample=out.pred_original_sample)


class SearchedFlowMatchScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler over `searched_timesteps` (tmpq's integer timesteps on a `FlowSchedule`):
    its sigmas are those timesteps' sigmas and its timesteps σ · T, whatever `num_inference_steps` a pipeline asks
    for. The Euler step is the parent's, so a pipeline and `CompressedSampler.sample` compute the same update."""

    searched_timesteps: tuple[int, ...] = ()
    searched_sigmas: torch.Tensor | None = None  # the FlowSchedule's sigmas at the searched timesteps

    @classmethod
    def from_searched(cls, schedule: FlowSchedule, timesteps: Sequence[int]) -> SearchedFlowMatchScheduler:
        sched = cls(num_train_timesteps=schedule.num_train_timesteps, shift=schedule.shift)
        sched.searched_timesteps = tuple(validate_timesteps(timesteps, schedule.num_train_timesteps))
        sched.searched_sigmas = schedule.sigmas[list(sched.searched_timesteps)]
        sched.set_timesteps()
        return sched

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        **_,
    ):
        """Use the searched timesteps; `num_inference_steps`, custom `sigmas` and FLUX's `mu` are ignored (named
        here because pipelines check the signature before passing them)."""
        sigmas = self.searched_sigmas
        if sigmas is None:
            raise TmpqError("no searched timesteps: build the scheduler with SearchedFlowMatchScheduler.from_searched")
        self.num_inference_steps = len(sigmas)
        self.timesteps = (sigmas * self.config.num_train_timesteps).to(device)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)]).to(device)
        self._step_index = None
        self._begin_index = None
