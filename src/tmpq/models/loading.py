"""Turn a model spec string into (denoiser, noise schedule, sample shape).

Specs: `builtin:fashion`; a `.safetensors` UNet from `tmpq train`; a diffusers pipeline or model, as a local
directory or a hub id (both through diffusers' own `load_config` / `from_pretrained`); or
`package.module:factory`, a function returning a `LoadedModel` or `(denoiser, NoiseSchedule, sample_shape)`.

Pipelines: pixel-space UNet2DModel (DDPM/DDIM), latent UNet2DModel + VAE/VQ-VAE (LDM), and text-to-image
UNet2DConditionModel + VAE + tokenizer + text encoder (Stable Diffusion 1.x/2.x style). Only the UNet becomes the
denoiser (and is quantized); the autoencoder and text encoder stay beside it at full precision (`models.parts`).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from tmpq.errors import TmpqError
from tmpq.models.builtin import BUILTIN_SCHEDULE, BUILTIN_UNET, load_builtin_unet, load_unet_safetensors
from tmpq.models.denoiser import GuidedDenoiser, UNetDenoiser
from tmpq.models.parts import LatentDecoder, PipelineParts, TextEncoder, read_prompts
from tmpq.sampling.conditioning import Conditioning
from tmpq.sampling.schedules import NoiseSchedule

BUILTIN_SPEC = "builtin:fashion"
SUPPORTED = (
    f"{BUILTIN_SPEC!r}, a .safetensors UNet from `tmpq train`, a diffusers pipeline (directory or hub id) whose "
    "denoiser is a UNet2DModel (pixel space, or latent with a vae/vqvae) or a text-conditioned UNet2DConditionModel "
    "(with vae, tokenizer and text_encoder, Stable Diffusion 1.x/2.x style), a bare UNet2DModel, or "
    "'package.module:factory'"
)
DEFAULT_GUIDANCE = 7.5
"""StableDiffusionPipeline's default guidance scale."""
KINDS = ("pixel", "latent", "text2image")
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass
class LoadedModel:
    """A denoiser (the only part tmpq quantizes), its noise schedule and sample shape (the latent shape for a
    latent model), and the full-precision parts around it: `decoder` (latents → images), `text_encoder` with the
    `prompts` used for calibration and fitness, and where the pipeline came from (`pipeline_class`)."""

    denoiser: nn.Module
    schedule: NoiseSchedule
    sample_shape: tuple[int, ...]
    spec: str
    weights_path: Path | None
    notes: tuple[str, ...] = ()  # what the loader had to assume (e.g. a default noise schedule)
    kind: str = "pixel"  # pixel | latent | text2image
    decoder: LatentDecoder | None = None
    text_encoder: TextEncoder | None = None
    prompts: tuple[str, ...] = ()
    pipeline_class: str | None = None
    options: dict = field(default_factory=dict)  # load_model keyword arguments that reload this model exactly
    _table: torch.Tensor | None = field(default=None, repr=False)

    @property
    def conditional(self) -> bool:
        return self.text_encoder is not None

    @property
    def parts(self) -> PipelineParts:
        return PipelineParts(self.kind, self.decoder, self.text_encoder, self.prompts, self.pipeline_class)

    def prompt_table(self) -> torch.Tensor | None:
        """Embeddings of `prompts` (P, tokens, width), encoded once."""
        if self.text_encoder is None:
            return None
        if self._table is None:
            self._table = self.text_encoder(self.prompts)
        return self._table

    def conditioning(self, num_samples: int) -> Conditioning | None:
        """Sample i gets prompt i mod P (None for an unconditional model)."""
        table = self.prompt_table()
        return None if table is None else Conditioning.cycle(table, num_samples)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from the denoiser's samples (latents are decoded; pixels pass through)."""
        return samples if self.decoder is None else self.decoder(samples)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of a decoded image (the sample shape for pixel models)."""
        if self.decoder is None:
            return tuple(self.sample_shape)
        cfg = self.decoder.vae.config
        f = 2 ** (len(cfg.block_out_channels) - 1)
        return (int(cfg.out_channels), self.sample_shape[1] * f, self.sample_shape[2] * f)


def load_model(
    spec: str = BUILTIN_SPEC, *, prompts: Sequence[str] | None = None, guidance_scale: float | None = None
) -> LoadedModel:
    """Load any supported model spec (see the module doc); a clear error names what is supported.

    `prompts` (text-to-image only; default: the shipped list) condition calibration and fitness samples;
    `guidance_scale` is the classifier-free guidance the sampler applies (default 7.5)."""
    is_factory = _FACTORY.fullmatch(spec) is not None and not Path(spec).exists()
    if not (spec.startswith("builtin:") or is_factory or spec.endswith(".safetensors") or Path(spec).is_file()):
        return _from_diffusers(spec, prompts, guidance_scale)
    if prompts is not None or guidance_scale is not None:
        raise TmpqError(f"prompts and a guidance scale apply to text-to-image pipelines only, not to {spec!r}")
    if spec == BUILTIN_SPEC:
        unet, path, schedule = load_builtin_unet(), BUILTIN_UNET, BUILTIN_SCHEDULE
    elif spec.startswith("builtin:"):
        raise TmpqError(f"unknown built-in model {spec!r}; the built-in model is {BUILTIN_SPEC!r}")
    elif is_factory:
        return _from_factory(spec)
    elif spec.endswith(".safetensors"):
        path = Path(spec)
        if not path.is_file():
            raise TmpqError(f"model {spec!r} not found; pass {SUPPORTED}")
        unet = load_unet_safetensors(path)
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        schedule = NoiseSchedule(**json.loads(meta["noise_schedule"])) if "noise_schedule" in meta else BUILTIN_SCHEDULE
    else:
        raise TmpqError(f"{spec!r} is not a supported model file; pass {SUPPORTED}")
    den = UNetDenoiser(unet, schedule).eval()
    return LoadedModel(den, schedule, den.sample_shape, spec, path)


def _from_factory(spec: str) -> LoadedModel:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise TmpqError(f"model factory {spec!r} cannot be imported ({e}); pass {SUPPORTED}") from None
    out = fn()
    if isinstance(out, LoadedModel):
        return out
    try:
        denoiser, schedule, shape = out
    except (TypeError, ValueError):
        raise TmpqError(
            f"model factory {spec!r} returned {type(out).__name__}; it must return a tmpq LoadedModel or "
            "(denoiser, NoiseSchedule, sample_shape)"
        ) from None
    if not isinstance(denoiser, nn.Module) or not isinstance(schedule, NoiseSchedule):
        raise TmpqError(f"model factory {spec!r} must return (nn.Module denoiser, NoiseSchedule, sample_shape)")
    return LoadedModel(denoiser.eval(), schedule, tuple(int(s) for s in shape), spec, None)


def _from_diffusers(spec: str, prompts: Sequence[str] | None, guidance_scale: float | None) -> LoadedModel:
    """A diffusers pipeline (model_index.json) or a bare UNet2DModel, local or from the hub."""
    from diffusers import DiffusionPipeline, UNet2DModel

    local = Path(spec)
    if not local.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") != 1):
        raise TmpqError(f"model {spec!r} not found; pass {SUPPORTED}")
    try:
        index = DiffusionPipeline.load_config(spec)
    except (OSError, ValueError):
        index = None
    if index is not None:
        return _from_pipeline(spec, dict(index), prompts, guidance_scale)
    if prompts is not None or guidance_scale is not None:
        raise TmpqError(f"prompts and a guidance scale apply to text-to-image pipelines only, not to {spec!r}")
    try:
        cfg = UNet2DModel.load_config(spec)
    except (OSError, ValueError) as e:
        raise TmpqError(f"could not load {spec!r} as a diffusers pipeline or model ({e}); pass {SUPPORTED}") from None
    if cfg.get("_class_name") != "UNet2DModel":
        raise TmpqError(f"{spec!r} holds a {cfg.get('_class_name')}, not a UNet2DModel; pass {SUPPORTED}")
    schedule, notes = _schedule(spec, None)
    unet = _component(spec, None, "diffusers", "UNet2DModel")
    den = UNetDenoiser(unet.eval(), schedule).eval()
    return LoadedModel(den, schedule, den.sample_shape, spec, _weights(local, None), notes)


def _from_pipeline(spec: str, index: dict, prompts: Sequence[str] | None, guidance_scale: float | None) -> LoadedModel:
    """Pixel, latent or text-to-image pipeline: the UNet is the denoiser, the rest stays at full precision."""
    parts = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}
    name = index.get("_class_name")
    unet_class = parts.get("unet", [None, None])[1]
    vae_key = next((k for k in ("vae", "vqvae") if k in parts), None)
    extra = sorted(set(parts) - {"unet", "scheduler", "vae", "vqvae", "text_encoder", "tokenizer"})
    if unet_class not in ("UNet2DModel", "UNet2DConditionModel") or extra:
        raise TmpqError(
            f"{spec!r} is a {name} with a {unet_class or 'non-UNet'} denoiser and components "
            f"{sorted(parts)}; this is not supported. Supported: {SUPPORTED}"
        )
    text2image = unet_class == "UNet2DConditionModel"
    if text2image and not {"text_encoder", "tokenizer"} <= set(parts):
        raise TmpqError(
            f"{spec!r} is a {name} with a UNet2DConditionModel but no text_encoder + tokenizer; only text-conditioned "
            f"UNet2DConditionModel pipelines are supported. Supported: {SUPPORTED}"
        )
    if not text2image and (prompts is not None or guidance_scale is not None):
        raise TmpqError(f"prompts and a guidance scale apply to text-to-image pipelines only, not to {spec!r} ({name})")
    if not text2image and "text_encoder" in parts:
        raise TmpqError(
            f"{spec!r} ({name}) has a text encoder but an unconditional UNet2DModel. Supported: {SUPPORTED}"
        )
    schedule, notes = _schedule(spec, "scheduler")
    unet = _component(spec, "unet", *parts["unet"]).eval()
    decoder = LatentDecoder(_component(spec, vae_key, *parts[vae_key]), key=vae_key) if vae_key else None
    kind = "text2image" if text2image else "latent" if decoder is not None else "pixel"
    common = dict(
        spec=spec,
        weights_path=_weights(Path(spec), "unet"),
        notes=notes,
        kind=kind,
        decoder=decoder,
        pipeline_class=name,
    )
    if not text2image:
        den = UNetDenoiser(unet, schedule).eval()
        return LoadedModel(den, schedule, den.sample_shape, **common)
    if getattr(unet.config, "addition_embed_type", None) or getattr(unet.config, "class_embed_type", None):
        raise TmpqError(
            f"{spec!r}: UNets with extra conditioning ({unet.config.addition_embed_type or 'class embeddings'}, "
            f"e.g. SDXL) are not supported; Supported: {SUPPORTED}"
        )
    text = TextEncoder(
        _component(spec, "tokenizer", *parts["tokenizer"]), _component(spec, "text_encoder", *parts["text_encoder"])
    )
    g = DEFAULT_GUIDANCE if guidance_scale is None else float(guidance_scale)
    prompts = tuple(prompts) if prompts is not None else read_prompts()
    den = GuidedDenoiser(unet, schedule, text([""]), g).eval()
    options = {"prompts": list(prompts), "guidance_scale": g}
    return LoadedModel(den, schedule, den.sample_shape, **common, text_encoder=text, prompts=prompts, options=options)


def _component(spec: str, subfolder: str | None, library: str, class_name: str):
    """One pipeline component through its own library's `from_pretrained` (diffusers or transformers)."""
    try:
        module = importlib.import_module(library)
    except ImportError:
        raise TmpqError(
            f"{spec!r} needs the {library!r} package for its {subfolder}; install it: pip install 'tmpq[t2i]'"
        ) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise TmpqError(f"{library} has no {class_name} (the {subfolder} of {spec!r}); upgrade {library}")
    try:
        return cls.from_pretrained(spec, subfolder=subfolder)
    except (OSError, ValueError) as e:
        raise TmpqError(f"could not load the {subfolder or 'model'} of {spec!r} ({e})") from None


def _schedule(spec: str, subfolder: str | None) -> tuple[NoiseSchedule, tuple[str, ...]]:
    sched = _scheduler_config(spec, subfolder)
    if sched is None:
        note = "no scheduler config found: assumed DDPM with T = 1000, linear betas 1e-4..0.02, epsilon"
        return NoiseSchedule.from_scheduler_config({}), (note,)
    return NoiseSchedule.from_scheduler_config(sched), ()


def _weights(local: Path, subfolder: str | None) -> Path | None:
    if not local.is_dir():
        return None
    found = sorted((local / (subfolder or "")).glob("diffusion_pytorch_model*.safetensors"))
    return found[0] if found else None


def _scheduler_config(spec: str, subfolder: str | None) -> dict | None:
    """The scheduler config of a pipeline (its `scheduler/`) or beside a bare model; None when there is none.
    Any scheduler class reads it: `load_config` is diffusers' ConfigMixin, the same for local dirs and hub ids."""
    from diffusers import DDPMScheduler

    for sub in [subfolder] if subfolder else [None, "scheduler"]:
        try:
            return dict(DDPMScheduler.load_config(spec, subfolder=sub))
        except (OSError, ValueError):
            continue
    return None
