"""Hand a compressed sampler back as a diffusers pipeline: its quantized denoiser (UNet or DiT), its timesteps, its FP
parts.

The pipeline's `unet` is the very module the super-network quantized in place (its layers are the quantized
twins); a forward pre-hook switches it to the bit allocation of the timestep it is called at, as
`PhasedDenoiser` does inside tmpq. The scheduler is a `SearchedDDIMScheduler` on the searched timesteps. So
`pipe()` (unconditional) or `pipe(prompt)` (text-to-image; its classifier-free guidance is the pipeline's own,
pass the `guidance_scale` the search used, `sampler.guidance_scale`) works as with the original pipeline.
"""

from __future__ import annotations

import inspect

import torch

from tmpq.compressed import CompressedSampler
from tmpq.errors import TmpqError

DEFAULT_PIPELINES = {
    "pixel": "DDIMPipeline",
    "latent": "LDMPipeline",
    "text2image": "StableDiffusionPipeline",
    "class2image": "DiTPipeline",
}
"""The pipeline class for a model that did not come as a pipeline (a tmpq-trained or bare UNet)."""


def _switch_hook(sampler: CompressedSampler):
    by_t = dict(sampler.step_configs())
    sn = sampler.supernet
    den = sampler.supernet.model
    if hasattr(den, "network_timestep"):  # flow matching: the network is called at σ · T (FLUX: σ), not at k
        by_t = {float(den.network_timestep(torch.tensor([k]))): cfg for k, cfg in by_t.items()}

    def hook(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t0 = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        key = min(by_t, key=lambda k: abs(k - t0))  # integer timesteps match exactly; σ · T to float rounding
        if abs(key - t0) > 1e-3 * max(1.0, abs(t0)):
            raise TmpqError(f"timestep {t0:g} is not one of this compressed model's steps {sorted(by_t)}")
        if sn.config is not by_t[key]:
            sn.set_config(by_t[key])

    return hook


def to_diffusers(sampler: CompressedSampler):
    """A diffusers pipeline of the sampler's model kind (the source pipeline's class when known).

    The pipeline shares the sampler's modules: sampling from one switches the bits of the other, and
    `sampler.sample()` returns the model to full precision when it finishes."""
    import diffusers

    from tmpq.sampling.scheduler import SearchedDDIMScheduler, SearchedFlowMatchScheduler  # imports diffusers

    parts = sampler.parts
    if parts.kind == "class2image" and parts.decoder is None:
        raise TmpqError(
            "a pixel-space class-conditional DiT (such as builtin:fashion-dit) has no diffusers pipeline: DiTPipeline "
            "decodes latents with a VAE; sample with tmpq instead (`sampler.sample(n, classes=[...])`, `tmpq sample`)"
        )
    name = parts.pipeline_class or DEFAULT_PIPELINES[parts.kind]
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise TmpqError(f"diffusers has no pipeline class {name!r}; upgrade diffusers")
    unet = sampler.supernet.model.unet
    handle = getattr(unet, "_tmpq_switch", None)
    if handle is not None:
        handle.remove()
    unet._tmpq_switch = unet.register_forward_pre_hook(_switch_hook(sampler), with_kwargs=True)
    key = "unet" if type(unet).__name__.startswith("UNet") else "transformer"  # DiT, PixArt: `transformer`
    flow = sampler.schedule.prediction_type == "flow"
    scheduler = (SearchedFlowMatchScheduler if flow else SearchedDDIMScheduler).from_searched(
        sampler.schedule, sampler.timesteps
    )
    components = {key: unet, "scheduler": scheduler}
    if parts.decoder is not None:
        components[parts.decoder.key] = parts.decoder.vae
    if parts.text_encoder is not None:
        components |= parts.text_encoder.components()
    params = inspect.signature(cls.__init__).parameters
    kwargs = {}
    for key, p in params.items():
        if key in ("self", "args", "kwargs"):
            continue
        if key in components:
            kwargs[key] = components[key]
        elif key == "requires_safety_checker":
            kwargs[key] = False  # the source pipeline had none, or tmpq did not load it
        elif p.default is inspect.Parameter.empty:
            kwargs[key] = None  # optional components (safety checker, feature extractor)
    missing = set(components) - set(kwargs)
    if missing:
        raise TmpqError(f"{name} takes no {sorted(missing)}; the compressed model needs a pipeline that does")
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
