"""Noise schedules (betas -> alphas_cumprod) and sampling-timestep lists.

The timestep generators follow DDIM / Q-Diffusion: `uniform` is diffusers' "leading" spacing
(0, T/K, 2T/K, ...), `quad` is int(linspace(0, sqrt(0.8 T), K)^2). Every list handed to a sampler
goes through `validate_timesteps`, so a bad schedule fails before any compute is spent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tmpq.errors import TmpqError

SCHEDULE_KINDS = ("uniform", "quad")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _cos_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete DDPM forward process: q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I), a = alphas_cumprod."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"  # what the model predicts: epsilon | sample (x0) | v_prediction
    # DDIM clips its x0 estimate to [-range, range] (pixel models); latent models declare clip_sample = False
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise TmpqError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise TmpqError(f"prediction_type {self.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
        T = self.num_train_timesteps
        if self.beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine schedule, as diffusers builds it
            betas = torch.tensor([min(1 - _cos_bar((i + 1) / T) / _cos_bar(i / T), 0.999) for i in range(T)])
            object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas.float(), dim=0))
            return
        if not 0 < self.beta_start < self.beta_end < 1:
            raise TmpqError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float32) ** 2
        else:
            raise TmpqError(
                f"unknown beta_schedule {self.beta_schedule!r}; use 'linear', 'scaled_linear' or 'squaredcos_cap_v2'"
            )
        # float32 throughout, like diffusers, so our sampler and DDIMScheduler see bit-identical alphas.
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample x_t from q(x_t | x_0) for a batch of integer timesteps t."""
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def to_dict(self) -> dict:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "prediction_type": self.prediction_type,
            "clip_sample": self.clip_sample,
            "clip_sample_range": self.clip_sample_range,
        }

    @classmethod
    def from_scheduler_config(cls, config: dict) -> NoiseSchedule:
        """From a diffusers scheduler config (DDPM/DDIM/PNDM/... all declare the same training process)."""
        if config.get("trained_betas") is not None:
            raise TmpqError("schedulers with explicit trained_betas are not supported yet; use a beta_schedule")
        return cls(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_start=float(config.get("beta_start", 1e-4)),
            beta_end=float(config.get("beta_end", 0.02)),
            beta_schedule=str(config.get("beta_schedule", "linear")),
            prediction_type=str(config.get("prediction_type", "epsilon")),
            clip_sample=bool(config.get("clip_sample", True)),
            clip_sample_range=float(config.get("clip_sample_range", 1.0)),
        )

    def timesteps(self, kind: str, num_steps: int) -> list[int]:
        """A named sampling schedule on this process ('uniform' or 'quad', see `make_timesteps`)."""
        return make_timesteps(kind, num_steps, self.num_train_timesteps)

    def to_epsilon(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's output as an ε prediction, whatever it predicts (DDIM, calibration and search use ε)."""
        if self.prediction_type == "epsilon":
            return output
        a = self.alphas_cumprod.to(x_t.device)[t].view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        if self.prediction_type == "sample":  # x0: eps = (x_t - sqrt(a) x0) / sqrt(1 - a)
            return (x_t - a.sqrt() * output) / (1 - a).sqrt()
        return a.sqrt() * output + (1 - a).sqrt() * x_t  # v = sqrt(a) eps - sqrt(1 - a) x0


FLOW_SPACINGS = ("linspace", "trailing")

_FLOW_UNSUPPORTED = (
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


@dataclass(frozen=True)
class FlowSchedule:
    """Flow matching (rectified flow) as diffusers' `FlowMatchEulerDiscreteScheduler` trains it: x_σ = (1 − σ) x_0 +
    σ ε, and the model predicts the velocity v = ε − x_0 when called at timestep σ · T.

    tmpq's integer timestep k (0 <= k < T) is the k-th of the scheduler's own T-step sigmas from the small end, so
    k = T − 1 is pure noise (σ = 1) and any decreasing list of k is a sampling schedule, as DDIM's timesteps are.
    diffusers' own N-step schedules are subsets of this grid whenever N − 1 divides T − 1 (for T = 1000: 2, 4, 10,
    28, 38, 112 ... steps), so the sampler equals its `FlowMatchEulerDiscreteScheduler` there.

    DDIM's deterministic update keeps the x_0 and ε predictions of the current step fixed and moves to the next noise
    level; in flow coordinates that is exactly Euler's step x' = x + (σ' − σ) v, which is what `DDIMSampler` does on a
    flow schedule. `alphas_cumprod` holds the variance-preserving equivalent ᾱ = (1 − σ)² / ((1 − σ)² + σ²), for
    what reads a noise level in those terms (plots, the 'change' grouping's error profile).

    FLUX-style resolution-dependent shifting (`use_dynamic_shifting`) is a fixed exponential shift `mu` once the
    image size is known (`from_scheduler_config(..., image_seq_len=...)`), so it is just another grid. `spacing`
    is how the pipeline spaces an N-step schedule: "linspace" (Stable Diffusion 3: σ from 1 to the smallest σ) or
    "trailing" (FLUX: σ = 1, (N − 1)/N, …, 1/N before shifting, on the grid whenever N divides T)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    mu: float | None = None  # the exponential time shift of dynamic shifting; None: the fixed `shift`
    spacing: str = "linspace"  # linspace | trailing: what 'uniform' means on this schedule
    prediction_type: str = field(default="flow", init=False)
    clip_sample: bool = field(default=False, init=False)
    clip_sample_range: float = field(default=1.0, init=False)
    sigmas: torch.Tensor = field(init=False, repr=False, compare=False)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if self.num_train_timesteps < 2:
            raise TmpqError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise TmpqError(f"the flow schedule's shift must be a positive number, got {self.shift}")
        if self.mu is not None and not math.isfinite(self.mu):
            raise TmpqError(f"the flow schedule's mu must be a finite number, got {self.mu}")
        if self.spacing not in FLOW_SPACINGS:
            raise TmpqError(f"unknown flow schedule spacing {self.spacing!r}; use one of {', '.join(FLOW_SPACINGS)}")
        dynamic = self.mu is not None
        sched = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.num_train_timesteps, shift=self.shift, use_dynamic_shifting=dynamic
        )
        sched.set_timesteps(self.num_train_timesteps, **({"mu": self.mu} if dynamic else {}))
        sigmas = sched.sigmas[:-1].flip(0).float()  # the T sigmas without the final 0, smallest first
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "alphas_cumprod", (1 - sigmas) ** 2 / ((1 - sigmas) ** 2 + sigmas**2))

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network is conditioned on: σ · T (a float), as the diffusers pipelines pass it."""
        return self.sigmas.to(t.device)[t] * self.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample x_σ for a batch of integer timesteps t."""
        s = self.sigmas.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - s) * x0 + s * noise

    def to_dict(self) -> dict:
        d = {"kind": "flow", "num_train_timesteps": self.num_train_timesteps, "shift": self.shift}
        if self.mu is not None:  # written only when set: files (and fingerprints) of fixed-shift schedules unchanged
            d["mu"] = self.mu
        if self.spacing != "linspace":
            d["spacing"] = self.spacing
        return d

    def timesteps(self, kind: str, num_steps: int) -> list[int]:
        """Sampling schedules that start from pure noise: k = T − 1 (σ = 1), then the named schedule with one step
        fewer over [0, T − 1). 'uniform' is then diffusers' own N-step schedule wherever N − 1 divides T − 1; on a
        "trailing" schedule it is the FLUX pipeline's, k = T·j/N − 1 for j = N … 1 (exact when N divides T)."""
        if kind == "uniform" and self.spacing == "trailing":
            _check_num_steps(num_steps, self.num_train_timesteps)
            t = self.num_train_timesteps
            return [max(0, round(t * j / num_steps) - 1) for j in range(num_steps, 0, -1)]
        return flow_timesteps(kind, num_steps, self.num_train_timesteps)

    @classmethod
    def from_scheduler_config(
        cls, config: dict, image_seq_len: int | None = None, spacing: str = "linspace"
    ) -> FlowSchedule:
        """From a FlowMatchEulerDiscreteScheduler config. Dynamic shifting needs the image's token count (the FLUX
        pipeline's `calculate_shift`, from the config's base/max shift and sequence lengths); options that make the
        sigmas depend on the step count (Karras sigmas, a terminal shift, ...) are refused by name."""
        used = [k for k in _FLOW_UNSUPPORTED if config.get(k)]
        if used:
            raise TmpqError(
                f"the flow-matching scheduler sets {used}; tmpq supports FlowMatchEulerDiscreteScheduler with a fixed "
                "`shift` (Stable Diffusion 3 style) or FLUX's dynamic shifting"
            )
        num_train, shift = int(config.get("num_train_timesteps", 1000)), float(config.get("shift", 1.0))
        if not config.get("use_dynamic_shifting"):
            return cls(num_train, shift, spacing=spacing)
        if config.get("time_shift_type", "exponential") != "exponential":
            raise TmpqError(
                f"the flow-matching scheduler's time_shift_type is {config.get('time_shift_type')!r}; tmpq supports "
                "dynamic shifting of the 'exponential' type (FLUX) only"
            )
        if image_seq_len is None:
            raise TmpqError(
                "this flow-matching scheduler shifts its sigmas by the image size (use_dynamic_shifting); tmpq "
                "supports it for FLUX pipelines, which give the image size"
            )
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return cls(num_train, shift, mu=float(mu), spacing=spacing)


def flow_timesteps(kind: str, num_steps: int, num_train_timesteps: int) -> list[int]:
    """A flow-matching schedule: T − 1 first (pure noise: a flow sampler has no other start), then `kind` with
    num_steps − 1 steps over the other T − 1 timesteps."""
    _check_num_steps(num_steps, num_train_timesteps)
    rest = make_timesteps(kind, num_steps - 1, num_train_timesteps - 1) if num_steps > 1 else []
    return [num_train_timesteps - 1, *rest]


def is_flow_config(config: dict) -> bool:
    """Whether a diffusers scheduler config describes flow matching (it names FlowMatch*, or has a `shift`)."""
    return "FlowMatch" in str(config.get("_class_name", "")) or ("shift" in config and "beta_start" not in config)


def schedule_from_dict(d: dict) -> NoiseSchedule | FlowSchedule:
    """A schedule from its `to_dict` (files written before flow schedules existed are DDPM noise schedules)."""
    d = dict(d)
    if d.pop("kind", "ddpm") == "flow":
        return FlowSchedule(**d)
    return NoiseSchedule(**d)


def uniform_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """DDIM uniform ("leading") spacing, decreasing: identical to diffusers' DDIMScheduler default."""
    _check_num_steps(num_steps, num_train_timesteps)
    step = num_train_timesteps // num_steps
    return [int(t) for t in (np.arange(num_steps) * step)[::-1]]


def quad_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """DDIM/Q-Diffusion quadratic spacing: dense near t = 0, where fine detail is formed.

    For many steps the rule int(linspace(0, sqrt(0.8 T), K)^2) repeats small timesteps (0, 0, 1, ...);
    those are bumped up by one so the list stays strictly decreasing with exactly K entries.
    """
    _check_num_steps(num_steps, num_train_timesteps)
    ts = (np.linspace(0, np.sqrt(num_train_timesteps * 0.8), num_steps) ** 2).astype(int).tolist()
    for i in range(1, len(ts)):
        ts[i] = max(ts[i], ts[i - 1] + 1)  # ts[i] >= i, so it never reaches T while num_steps <= T
    return [int(t) for t in ts[::-1]]


def make_timesteps(kind: str, num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """A named schedule: 'uniform' or 'quad'."""
    if kind == "uniform":
        return uniform_timesteps(num_steps, num_train_timesteps)
    if kind == "quad":
        return quad_timesteps(num_steps, num_train_timesteps)
    raise TmpqError(f"unknown schedule {kind!r}; use one of {', '.join(SCHEDULE_KINDS)}")


def _check_num_steps(num_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_steps <= num_train_timesteps:
        raise TmpqError(f"number of steps must be in [1, {num_train_timesteps}], got {num_steps}")


def phase_of(t: int, phase_bounds: Sequence[int]) -> int:
    """Bit phase of timestep t: phase 0 holds the noisiest steps (t >= every bound), the last the final ones."""
    return sum(1 for b in phase_bounds if t < b)


def validate_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> list[int]:
    """Check a sampling schedule: non-empty, integers in [0, T), strictly decreasing (hence no duplicates)."""
    ts = list(timesteps)
    if not ts:
        raise TmpqError("the timestep list is empty; give at least one timestep")
    for t in ts:
        if isinstance(t, bool) or int(t) != t:
            raise TmpqError(f"timestep {t!r} is not an integer")
    ts = [int(t) for t in ts]
    bad = [t for t in ts if not 0 <= t < num_train_timesteps]
    if bad:
        raise TmpqError(f"timesteps {bad} are outside [0, {num_train_timesteps}); each must satisfy 0 <= t < T")
    if len(set(ts)) != len(ts):
        dup = sorted({t for t in ts if ts.count(t) > 1})
        raise TmpqError(f"timesteps {dup} appear more than once; each timestep may be used once")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise TmpqError(f"timesteps must be strictly decreasing (from noise to image), got {ts}")
    return ts
