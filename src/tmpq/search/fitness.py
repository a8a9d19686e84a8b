"""Fitness of a candidate: sample with its schedule and bits from fixed noise seeds, then score.

Every candidate sees the same seeds, so differences between candidates are not sampling noise of the
initial latents. 'kid' (the default) is KID against the real data, 'fid' (the paper's fitness) FID; 'proxy' is the mean
distance, sample by sample, to the FP model's samples from the same noise at many steps; 'fid_to_fp' is FID against
those FP samples as a set (fidelity to the FP model, as MixDQ and ViDiT-Q judge quantized samplers, where FID against
the data also rewards errors that happen to move samples towards the data). The proxy was the default
until it was measured on the sound built-in model: among a search's 14 best candidates it ranked the uniform
baseline (FID 65 on 1,000 held-out samples) level with a candidate at 125 (Spearman ρ 0.69 with that FID), where FID
on 128 samples ranked them close to the held-out FID (ρ 0.96; docs/results.md, "Which fitness ranks candidates").
The proxy stays for models the classifier cannot score (`proxy_space='pixels'`).

Latent models are scored on decoded images, not latents: the decoder is nonlinear and weighs latent channels
unequally, so a latent distance can rank candidates differently from what the user sees; one full-precision
decode per sample is cheap next to the K denoiser steps that made it. Text-to-image candidates sample the same
prompts (sample i: prompt i mod P) from the same noise as the FP reference, so the proxy stays paired.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tmpq.compressed import PhasedDenoiser
from tmpq.errors import TmpqError
from tmpq.metrics.fid import QualityMetric
from tmpq.quant.supernet import SuperNet
from tmpq.sampling.conditioning import Conditioning
from tmpq.sampling.ddim import DDIMSampler, generate
from tmpq.sampling.schedules import NoiseSchedule
from tmpq.search.evolution import FitnessValue
from tmpq.search.space import Candidate, SearchSpace
from tmpq.serialization import DictConfig

FITNESS_KINDS = ("fid", "kid", "proxy", "fid_to_fp")
PAIRED_KINDS = ("proxy", "fid_to_fp")
"""The kinds scored against the FP model's own samples from the same noise (`reference_steps`)."""
FULL_STEPS = 100
"""FP 'at full steps': the proxy's target when nothing was measured, and the final table's FP reference."""


@dataclass(frozen=True)
class FitnessConfig(DictConfig):
    # "kid": KID against the data (the default: on 128 samples it tells samplers apart better than FID on 256, and
    # with the final race it shipped 59.24 against uniform PTQ's 65.94 on 5,000 samples; docs/results.md);
    # "fid": FID against the data; "proxy": distance to the FP model's samples from the same noise, sample by sample;
    # "fid_to_fp": FID against those FP samples as a set
    kind: str = "kid"
    num_samples: int = 128  # FID in the classifier's 128-d feature space needs more samples than its dimension; KID not
    seed: int = 0
    batch_size: int = 128
    # target of the paired kinds: FP DDIM at this many uniform steps. None: a search picks the step count at which
    # the FP model scores best on the fitness seeds (RUN/fp_steps.json); outside a search (no measurement) FULL_STEPS
    reference_steps: int | None = None
    proxy_space: str = "features"  # 'features' (classifier space) or 'pixels'
    proxy_stat: str = "mean"  # how per-sample distances are pooled: 'mean' or 'median' (robust to a few outliers)

    def __post_init__(self) -> None:
        if self.kind not in FITNESS_KINDS:
            raise TmpqError(f"fitness kind must be one of {FITNESS_KINDS}, got {self.kind!r}")
        if self.proxy_space not in ("features", "pixels"):
            raise TmpqError(f"proxy_space must be 'features' or 'pixels', got {self.proxy_space!r}")
        if self.proxy_stat not in ("mean", "median"):
            raise TmpqError(f"proxy_stat must be 'mean' or 'median', got {self.proxy_stat!r}")
        if self.num_samples < 2:
            raise TmpqError("fitness needs at least 2 samples")
        if self.reference_steps is not None and self.reference_steps < 1:
            raise TmpqError(f"the proxy's reference steps must be >= 1, got {self.reference_steps}")


class SampleFitness:
    """Callable fitness for the evolutionary search; counts the image-forwards it spends."""

    def __init__(
        self,
        supernet: SuperNet,
        space: SearchSpace,
        schedule: NoiseSchedule,
        sample_shape: Sequence[int],
        metric: QualityMetric,
        config: FitnessConfig = FitnessConfig(),
        reference: torch.Tensor | None = None,
        cond: Conditioning | None = None,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """`cond`: one conditioning entry per fitness sample (text-to-image); `decode`: latents → images."""
        self.sn, self.space, self.schedule, self.shape = supernet, space, schedule, tuple(sample_shape)
        self.metric, self.config = metric, config
        if cond is not None and len(cond) != config.num_samples:
            raise TmpqError(f"{len(cond)} conditioning entries for {config.num_samples} fitness samples")
        self.cond, self.decode = cond, decode
        self.reference = reference
        self.reference_forwards = 0
        self._ref_feats: torch.Tensor | None = None
        self._ref_stats: dict[str, torch.Tensor] | None = None

    def fp_reference(self) -> torch.Tensor:
        """FP samples from the fitness seeds at `reference_steps` (computed once; pass `reference` to reuse)."""
        if self.reference is None:
            cfg = self.config
            T = self.schedule.num_train_timesteps
            ts = self.schedule.timesteps("uniform", min(cfg.reference_steps or FULL_STEPS, T))
            self.reference = self.fp_samples(ts)
            self.reference_forwards = cfg.num_samples * len(ts)
        if self.reference.shape[0] != self.config.num_samples:
            raise TmpqError("the proxy reference has a different sample count than the fitness config")
        return self.reference

    def fp_samples(self, timesteps) -> torch.Tensor:
        """The full-precision model's (decoded) samples on `timesteps`, from the fitness seeds."""
        self.sn.set_fp()
        return self._generate(self.sn, timesteps)

    def samples(self, c: Candidate, space: SearchSpace | None = None) -> torch.Tensor:
        """The candidate's samples from the fitness seeds (`space`: the one it belongs to, if not this fitness's)."""
        space = space or self.space
        return self._generate(PhasedDenoiser(self.sn, space.step_configs(c)), c.timesteps)

    def _generate(self, model, timesteps) -> torch.Tensor:
        cfg = self.config
        sampler = DDIMSampler(self.schedule, timesteps)
        out = generate(
            model, sampler, cfg.num_samples, self.shape, cfg.seed, cfg.batch_size, progress=False, cond=self.cond
        )
        return out if self.decode is None else self.decode(out)

    def distance(self, images: torch.Tensor) -> float:
        ref = self.fp_reference()
        if self.config.proxy_space == "pixels":
            if self.config.proxy_stat == "mean":
                return float((images - ref).pow(2).mean())
            per_sample = (images - ref).pow(2).flatten(1).mean(1)
        else:
            if self._ref_feats is None:
                self._ref_feats = self.metric.features(ref)
            per_sample = (self.metric.features(images) - self._ref_feats).pow(2).sum(dim=1)
        # the mean lets a few diverged samples outweigh the rest (bench/peers.py --proxy-check); the median does not
        return float(per_sample.median() if self.config.proxy_stat == "median" else per_sample.mean())

    def fid_to_fp(self, images: torch.Tensor) -> float:
        """FID of `images` against the FP reference samples (their statistics computed once)."""
        if self._ref_stats is None:
            self._ref_stats = self.metric.stats(self.fp_reference())
        return self.metric.fid_between(images, reference_stats=self._ref_stats)

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> float:
        """The configured fitness of a sample set from the fitness seeds (lower is better)."""
        if self.config.kind == "fid":
            return self.metric.fid(images)
        if self.config.kind == "kid":
            return self.metric.kid(images)
        if self.config.kind == "fid_to_fp":
            return self.fid_to_fp(images)
        return self.distance(images)

    @torch.no_grad()
    def __call__(self, c: Candidate) -> FitnessValue:
        return FitnessValue(self.score(self.samples(c)), self.config.num_samples * len(c.timesteps))
