"""The compressed sampler a search hands over: a quantized denoiser switched per step, on its own timesteps,
with the full-precision parts of its pipeline (latent decoder, text encoder) beside it.

`CompressedSampler` is the same object whether it comes from a search in memory
(`CompressedSampler.from_candidate`) or from an exported directory (`tmpq.load`), so the two sample
bit-identically under the same seed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from tmpq.device import module_device
from tmpq.errors import TmpqError
from tmpq.models.parts import PipelineParts
from tmpq.quant.config import QuantConfig
from tmpq.quant.supernet import SuperNet
from tmpq.sampling.conditioning import Conditioning
from tmpq.sampling.ddim import DDIMSampler, generate
from tmpq.sampling.schedules import NoiseSchedule, phase_of, validate_timesteps


class PhasedDenoiser(nn.Module):
    """The super-network, switched to each step's configuration (bit phases) as sampling reaches it."""

    def __init__(self, supernet: SuperNet, step_configs: Sequence[tuple[int, QuantConfig]]) -> None:
        super().__init__()
        self.supernet = supernet
        self.by_t = dict(step_configs)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        t0 = int(t[0])
        if t0 not in self.by_t:
            raise TmpqError(f"timestep {t0} is not one of this compressed sampler's steps {sorted(self.by_t)}")
        cfg = self.by_t[t0]
        if self.supernet.config is not cfg:
            self.supernet.set_config(cfg)
        return self.supernet(x, t, cond)


class CompressedSampler:
    """Timesteps + per-phase bit allocations over a calibrated super-network; `sample()` makes images."""

    def __init__(
        self,
        supernet: SuperNet,
        schedule: NoiseSchedule,
        timesteps: Sequence[int],
        phase_configs: Sequence[QuantConfig],
        phase_bounds: Sequence[int] = (),
        sample_shape: Sequence[int] = (1, 32, 32),
        eta: float = 0.0,
        parts: PipelineParts = PipelineParts(),
    ) -> None:
        self.supernet = supernet
        self.schedule = schedule
        self.timesteps = validate_timesteps(timesteps, schedule.num_train_timesteps)
        self.phase_bounds = tuple(sorted(set(int(b) for b in phase_bounds), reverse=True))
        if len(phase_configs) != len(self.phase_bounds) + 1:
            raise TmpqError(
                f"{len(phase_configs)} bit allocation(s) for {len(self.phase_bounds) + 1} phase(s) "
                f"(bounds {list(self.phase_bounds)}); give one allocation per phase"
            )
        for cfg in phase_configs:
            supernet.validate(cfg)
        self.phase_configs = tuple(phase_configs)
        self.sample_shape = tuple(sample_shape)  # the denoiser's (latent, for a latent model) sample shape
        self.eta = eta
        self.parts = parts
        self.info: dict = {}  # what produced it (search summary, measured FID), carried into an export

    @classmethod
    def from_candidate(
        cls, supernet: SuperNet, space, candidate, schedule: NoiseSchedule, sample_shape, parts=PipelineParts()
    ) -> CompressedSampler:
        """The sampler of a search candidate (a `tmpq.search.Candidate` in a `SearchSpace`)."""
        space.validate(candidate)
        return cls(
            supernet,
            schedule,
            candidate.timesteps,
            space.quant_configs(candidate),
            space.phase_bounds,
            sample_shape,
            parts=parts,
        )

    @property
    def guidance_scale(self) -> float | None:
        """The classifier-free guidance the search used (text-to-image), None otherwise."""
        g = getattr(self.supernet.model, "guidance_scale", None)
        return None if g is None else float(g)

    def step_configs(self) -> list[tuple[int, QuantConfig]]:
        """(timestep, config) for each sampling step, in sampling order."""
        return [(t, self.phase_configs[phase_of(t, self.phase_bounds)]) for t in self.timesteps]

    @property
    def denoiser(self) -> PhasedDenoiser:
        return PhasedDenoiser(self.supernet, self.step_configs())

    def ddim(self) -> DDIMSampler:
        return DDIMSampler(self.schedule, self.timesteps, eta=self.eta)

    def bitops(self) -> int:
        """BitOPs per generated image (all steps)."""
        return sum(self.supernet.cost.bitops(cfg, 1) for _, cfg in self.step_configs())

    def size_bits(self) -> int:
        """Weight storage of the largest phase allocation (exact for one phase; phases that use other widths
        for the same layer ship those codes too, which this does not add)."""
        return max(self.supernet.cost.size_bits(c) for c in self.phase_configs) if self.phase_configs else 0

    def conditioning(
        self, num_samples: int, prompts: str | Sequence[str] | None = None, classes: Sequence[int] | None = None
    ) -> Conditioning | None:
        """Sample i gets prompt i mod len(prompts) (default: the prompts the search used), or for a class-conditional
        model label i mod len(classes) (default: the labels the search used); None when unconditional."""
        if self.parts.class_labels:
            if prompts is not None:
                raise TmpqError(
                    "this sampler is class-conditional: give classes (label ids: --classes 1,2 or classes=[1, 2]), "
                    "not prompts"
                )
            labels = list(classes) if classes is not None else list(self.parts.class_labels)
            if not labels or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in labels):
                raise TmpqError(f"classes must be a non-empty list of label ids (ints >= 0), got {classes!r}")
            return Conditioning.cycle(torch.tensor(labels, dtype=torch.long), num_samples)
        if classes is not None:
            raise TmpqError("this sampler is not class-conditional; it takes no classes")
        text = self.parts.text_encoder
        if text is None:
            if prompts is not None:
                raise TmpqError("this sampler is unconditional; it takes no prompts")
            return None
        prompts = (
            [prompts] if isinstance(prompts, str) else list(prompts if prompts is not None else self.parts.prompts)
        )
        return Conditioning.cycle(text(prompts), num_samples)

    def to(self, device: torch.device | str) -> CompressedSampler:
        """This sampler on `device`: the quantized denoiser and its FP parts move (in place; returns self)."""
        self.supernet.to(device)
        self.parts.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return module_device(self.supernet)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int = 64,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        prompts: str | Sequence[str] | None = None,
        decode: bool = True,
        classes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1], shape (N, C, H, W); sample i comes from seed `seed + i` (and, text-to-image, from
        prompt i mod len(prompts); class-conditional, from label i mod len(classes)). A latent model's samples are
        decoded by its FP autoencoder unless `decode` is False (then: latents of `sample_shape`)."""
        try:
            return sample_images(
                self, self.denoiser, num_samples, seed, batch_size, progress, prompts, decode, classes=classes
            )
        finally:
            self.supernet.set_fp()

    def to_diffusers(self):
        """A diffusers pipeline (`pipe()` / `pipe(prompt)`) running this sampler's quantized UNet on its timesteps."""
        from tmpq.pipeline import to_diffusers

        return to_diffusers(self)

    def to_pipeline(self):
        """Deprecated name of `to_diffusers`; kept for one release."""
        warnings.warn("CompressedSampler.to_pipeline() is deprecated; use .to_diffusers()", DeprecationWarning, 2)
        return self.to_diffusers()

    def lower(self, backend="int8", inplace: bool = False):
        """A `tmpq.runtime.RuntimeSampler` running these timesteps and bits on `backend` ('int8', 'packed',
        'fake' or a `tmpq.runtime.Backend`). `inplace` frees the super-network's other widths (this sampler is
        unusable afterwards): what keeps a freshly loaded export's memory small."""
        from tmpq.runtime.lowering import lower

        return lower(self, backend, inplace=inplace)

    def export(self, directory, **kwargs):
        """Write a self-contained directory that `tmpq.load` turns back into this sampler (see tmpq.export)."""
        from tmpq.export import export_sampler

        return export_sampler(self, directory, **kwargs)


def sample_images(
    sampler,
    denoiser,
    num_samples: int,
    seed: int,
    batch_size: int | None,
    progress: bool,
    prompts: str | Sequence[str] | None,
    decode: bool,
    device: torch.device | str | None = None,
    classes: Sequence[int] | None = None,
) -> torch.Tensor:
    """What every compressed sampler's `sample` does around its denoiser (the super-network's, or a runtime
    backend's): prompts to conditioning, DDIM from the per-sample seeds, decoding by the FP autoencoder."""
    cond = sampler.conditioning(num_samples, prompts, classes)
    out = generate(
        denoiser, sampler.ddim(), num_samples, sampler.sample_shape, seed, batch_size, device, progress, cond=cond
    )
    decoder = sampler.parts.decoder
    return decoder(out) if decode and decoder is not None else out
