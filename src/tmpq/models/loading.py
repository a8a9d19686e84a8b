"""Turn a model spec string into (denoiser, noise schedule, sample shape).

Specs: `builtin:fashion` (a UNet), `builtin:fashion-dit` (a class-conditional DiT); a `.safetensors` UNet or DiT from
`tmpq train`; a diffusers pipeline or model, as a local directory or a hub id (components through their own library's
`from_pretrained`); or `package.module:factory`, a function returning a `LoadedModel` or `(denoiser, NoiseSchedule,
sample_shape)`.

A model directory is data, not code: its `model_index.json` may only name the diffusers / transformers classes tmpq
supports (checked before anything is imported), and weights are read from safetensors only (pickle can run code).

Pipelines: pixel-space UNet2DModel (DDPM/DDIM), latent UNet2DModel + VAE/VQ-VAE (LDM), and text-to-image
UNet2DConditionModel + VAE + tokenizer + text encoder (Stable Diffusion 1.x/2.x style); transformers: class-conditional
DiT (DiTPipeline) and text-conditional PixArt-α/Σ (T5). Only the UNet or transformer becomes the denoiser (and is
quantized); the autoencoder and text encoder stay beside it at full precision (`models.parts`).
"""

from __future__ import annotations

import importlib
import json
import operator
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from tmpq.device import module_device
from tmpq.errors import TmpqError
from tmpq.models.builtin import (
    BUILTIN_DIT,
    BUILTIN_DIT_GUIDANCE,
    BUILTIN_SCHEDULE,
    BUILTIN_UNET,
    load_builtin,
    load_trained,
    trained_metadata,
)
from tmpq.models.denoiser import ClassDenoiser, GuidedDenoiser, UNetDenoiser
from tmpq.models.parts import LatentDecoder, PipelineParts, TextEncoder, quiet_load_kwargs, read_prompts
from tmpq.sampling.conditioning import Conditioning, call_denoiser
from tmpq.sampling.schedules import FlowSchedule, NoiseSchedule, is_flow_config

BUILTIN_SPEC = "builtin:fashion"
BUILTIN_DIT_SPEC = "builtin:fashion-dit"
BUILTINS = {BUILTIN_SPEC: BUILTIN_UNET, BUILTIN_DIT_SPEC: BUILTIN_DIT}
SUPPORTED = (
    f"{BUILTIN_SPEC!r}, {BUILTIN_DIT_SPEC!r}, a .safetensors UNet or DiT from `tmpq train`, a diffusers pipeline "
    "(directory or hub id) whose denoiser is a UNet2DModel (pixel space, or latent with a vae/vqvae) or a "
    "text-conditioned UNet2DConditionModel (with vae, tokenizer and text_encoder, Stable Diffusion 1.x/2.x style), a "
    "class-conditional DiTPipeline "
    "(DiTTransformer2DModel with a vae), a PixArt-α/Σ pipeline (PixArtTransformer2DModel with a vae, T5 tokenizer and "
    "text_encoder), a Stable Diffusion 3 pipeline (SD3Transformer2DModel, two CLIP encoders with projection and "
    "optionally T5, flow matching), a FLUX.1 pipeline (FluxTransformer2DModel, CLIP and T5, flow matching), a bare "
    "UNet2DModel, or 'package.module:factory'"
)
DEFAULT_GUIDANCE = 7.5
"""StableDiffusionPipeline's default guidance scale."""
DEFAULT_CLASS_GUIDANCE = 4.0
"""DiTPipeline's default guidance scale."""
DEFAULT_PIXART_GUIDANCE = 4.5
"""PixArtAlphaPipeline's and PixArtSigmaPipeline's default guidance scale."""
DEFAULT_SD3_GUIDANCE = 7.0
"""StableDiffusion3Pipeline's default guidance scale."""
DEFAULT_FLUX_GUIDANCE = 3.5
"""FluxPipeline's default (embedded) guidance scale."""
FLUX_DEFAULT_SAMPLE_SIZE = 128
"""FluxPipeline's default_sample_size: the default image side is 128 × the VAE's scale factor (1024 px for FLUX.1)."""
PIXART_PIPELINES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
KINDS = ("pixel", "latent", "text2image", "class2image")
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "unet": ("diffusers", ("UNet2DModel", "UNet2DConditionModel")),
    "transformer": (
        "diffusers",
        ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel"),
    ),
    "vae": ("diffusers", ("AutoencoderKL", "VQModel")),
    "vqvae": ("diffusers", ("AutoencoderKL", "VQModel")),
    "text_encoder": ("transformers", ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")),
    "text_encoder_2": ("transformers", ("CLIPTextModelWithProjection", "T5EncoderModel")),
    "tokenizer_2": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")),
    "text_encoder_3": ("transformers", ("T5EncoderModel",)),
    "tokenizer_3": ("transformers", ("T5Tokenizer", "T5TokenizerFast")),
    "scheduler": ("diffusers", ()),  # only its config is read, never the class: any diffusers *Scheduler
}
"""The library and classes each pipeline component may name. model_index.json chooses what `_component` imports,
so anything outside this list is refused before an import: a model directory must not run code."""
_SCHEDULER_CLASS = re.compile(r"[A-Za-z]\w*Scheduler")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_TIMEOUT_S = 10.0
_TRUE = ("1", "ON", "YES", "TRUE")


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
    class_labels: tuple[int, ...] = ()  # class-conditional models: sample i gets label i mod len(class_labels)
    _table: torch.Tensor | None = field(default=None, repr=False)

    @property
    def conditional(self) -> bool:
        return self.text_encoder is not None or bool(self.class_labels)

    @property
    def device(self) -> torch.device:
        return module_device(self.denoiser)

    def to(self, device: torch.device | str) -> LoadedModel:
        """This model with its denoiser and FP parts on `device` (moved in place; returns self for chaining)."""
        device = torch.device(device)
        self.denoiser.to(device)
        self.parts.to(device)
        if self._table is not None:
            self._table = self._table.to(device)
        return self

    @property
    def parts(self) -> PipelineParts:
        return PipelineParts(
            self.kind, self.decoder, self.text_encoder, self.prompts, self.pipeline_class, self.class_labels
        )

    def prompt_table(self) -> torch.Tensor | None:
        """Embeddings of `prompts` (P, tokens, width), encoded once; for a class-conditional model its label ids
        (P,), which the denoiser reads as class labels."""
        if self.class_labels:
            return torch.tensor(self.class_labels, dtype=torch.long)
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
    spec: str = BUILTIN_SPEC,
    *,
    prompts: Sequence[str] | None = None,
    guidance_scale: float | None = None,
    classes: Sequence[int] | None = None,
    image_size: int | Sequence[int] | None = None,
    true_cfg_scale: float | None = None,
) -> LoadedModel:
    """Load any supported model spec (see the module doc); a clear error names what is supported.

    `prompts` (text-to-image only; default: the shipped list) condition calibration and fitness samples;
    `classes` (class-conditional DiT only; default: every class) likewise, as label ids; `guidance_scale` is the
    classifier-free guidance the sampler applies (default 7.5 for text, 4.0 for classes, as their pipelines; FLUX:
    its embedded guidance, 3.5); `image_size` (FLUX only: pixels, one side or (height, width); default 1024) is the
    resolution the model is compressed for (FLUX's schedule shift depends on it); `true_cfg_scale` (FLUX only;
    default 1, off) is FluxPipeline's true classifier-free guidance, against the negative prompt "" (a second pass)."""
    is_factory = _FACTORY.fullmatch(spec) is not None and not Path(spec).exists()
    if not (spec.startswith("builtin:") or is_factory or spec.endswith(".safetensors") or Path(spec).is_file()):
        return _from_diffusers(spec, prompts, guidance_scale, classes, image_size, true_cfg_scale)
    if any(v is not None for v in (prompts, image_size, true_cfg_scale)):
        raise TmpqError(
            f"prompts, a true CFG scale and an image size apply to conditional pipelines only, not to {spec!r}"
        )
    if spec in BUILTINS:
        path = BUILTINS[spec]
        network = load_builtin(path)
    elif spec.startswith("builtin:"):
        raise TmpqError(f"unknown built-in model {spec!r}; the built-in models are {', '.join(map(repr, BUILTINS))}")
    elif is_factory:
        if classes is not None or guidance_scale is not None:
            raise TmpqError(f"classes and a guidance scale apply to class-conditional models only, not to {spec!r}")
        return _from_factory(spec)
    elif spec.endswith(".safetensors"):
        path = Path(spec)
        if not path.is_file():
            raise TmpqError(f"model {spec!r} not found; pass {SUPPORTED}")
        network = load_trained(path)
    else:
        raise TmpqError(f"{spec!r} is not a supported model file; pass {SUPPORTED}")
    schedule = _declared_schedule(path)
    if isinstance(network, DiTTransformer2DModel):
        g = BUILTIN_DIT_GUIDANCE if guidance_scale is None else float(guidance_scale)
        den = ClassDenoiser(network, schedule, g).eval()
        labels, options = _class_conditioning(spec, den, g, classes)
        return LoadedModel(
            den, schedule, den.sample_shape, spec, path, kind="class2image", options=options, class_labels=labels
        )
    if classes is not None or guidance_scale is not None:
        raise TmpqError(f"classes and a guidance scale apply to class-conditional models only, not to {spec!r}")
    den = UNetDenoiser(network, schedule).eval()
    return LoadedModel(den, schedule, den.sample_shape, spec, path)


def _class_conditioning(
    spec: str, den: ClassDenoiser, g: float, classes: Sequence[int] | None
) -> tuple[tuple[int, ...], dict[str, object]]:
    """The label ids a class-conditional model's calibration and fitness samples cycle over (default: every class),
    and the `load_model` options that reload it so (its guidance scale `g`; the classes when given)."""
    labels = tuple(range(den.num_classes)) if classes is None else tuple(classes)
    bad = [c for c in labels if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < den.num_classes]
    if not labels or bad:
        raise TmpqError(
            f"classes for {spec!r} must be label ids in [0, {den.num_classes}); got {list(labels)[:8] or 'none'}"
        )
    options = {
        "guidance_scale": float(den.guidance_scale),
        **({"classes": list(labels)} if classes is not None else {}),
    }
    return labels, options


def _declared_schedule(path: Path) -> NoiseSchedule:
    """The schedule a `tmpq train` file (a built-in one too) declares in its `noise_schedule` metadata, as a diffusers
    model ships its scheduler config: the training process and how DDIM samples it (the DiT without x̂0 clipping); a
    file without that key gets the built-in UNet's."""
    meta = trained_metadata(path)
    return _metadata_schedule(path, meta["noise_schedule"]) if "noise_schedule" in meta else BUILTIN_SCHEDULE


def _metadata_schedule(path: Path, text: str) -> NoiseSchedule:
    """The `noise_schedule` metadata of a `tmpq train` file (a damaged value is an error, not a traceback)."""
    try:
        return NoiseSchedule(**json.loads(text))
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError; unknown keys or a non-object: TypeError
        raise TmpqError(
            f"{path} has 'noise_schedule' metadata that is not a valid noise schedule ({e}); the file is damaged: "
            "re-train it with `tmpq train`"
        ) from None


def _from_factory(spec: str) -> LoadedModel:
    """Call a user's factory; whatever it raises or returns wrongly becomes one TmpqError naming the spec."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise TmpqError(f"model factory {spec!r} cannot be imported ({e}); pass {SUPPORTED}") from None
    except Exception as e:  # the user's module fails while it is imported
        raise TmpqError(
            f"model factory {spec!r}: importing {module} raised {type(e).__name__}: {e}; fix that module"
        ) from e
    if not callable(fn):
        raise TmpqError(f"model factory {spec!r} is a {type(fn).__name__}, not a function; name a function")
    try:
        out = fn()
    except Exception as e:
        raise TmpqError(
            f"model factory {spec!r} raised {type(e).__name__}: {e}; fix the factory so that it returns a tmpq "
            "LoadedModel or (denoiser, NoiseSchedule, sample_shape)"
        ) from e
    if isinstance(out, LoadedModel):
        loaded = out
    else:
        try:
            denoiser, schedule, shape = out
        except (TypeError, ValueError):
            raise TmpqError(
                f"model factory {spec!r} returned {type(out).__name__}; it must return a tmpq LoadedModel or "
                "(denoiser, NoiseSchedule, sample_shape)"
            ) from None
        if not isinstance(denoiser, nn.Module) or not isinstance(schedule, NoiseSchedule):
            raise TmpqError(f"model factory {spec!r} must return (nn.Module denoiser, NoiseSchedule, sample_shape)")
        loaded = LoadedModel(denoiser.eval(), schedule, shape, spec, None)
    loaded.sample_shape = _factory_shape(spec, loaded.sample_shape)
    _probe_factory(spec, loaded)
    return loaded


def _factory_shape(spec: str, shape) -> tuple[int, ...]:
    try:
        dims = tuple(operator.index(s) for s in shape)
    except TypeError:
        dims = ()
    if not dims or min(dims) < 1:
        raise TmpqError(
            f"model factory {spec!r} gave the sample shape {shape!r}; it must be positive integers, e.g. (3, 32, 32)"
        )
    return dims


def _probe_factory(spec: str, loaded: LoadedModel) -> None:
    """One no-grad pass on a zero batch of the sample shape: a factory's denoiser that fails or returns the wrong
    shape is refused here, with its spec named, rather than deep inside calibration (in eval mode, so no
    running statistics move)."""
    den = loaded.denoiser
    param = next((p for p in den.parameters() if p.is_floating_point()), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    x = torch.zeros(1, *loaded.sample_shape, device=device, dtype=dtype)
    t = torch.full((1,), loaded.schedule.num_train_timesteps // 2, dtype=torch.long, device=device)
    training = den.training
    den.eval()
    try:
        with torch.no_grad():
            out = call_denoiser(den, x, t, loaded.conditioning(1))
    except Exception as e:
        raise TmpqError(
            f"model factory {spec!r}: its denoiser fails on a batch of its sample shape {tuple(x.shape)} "
            f"({type(e).__name__}: {e}); fix the denoiser or the sample_shape the factory returns"
        ) from e
    finally:
        den.train(training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != tuple(x.shape):
        raise TmpqError(
            f"model factory {spec!r}: its denoiser returned {got} for an input of shape {tuple(x.shape)}; a denoiser "
            "returns the noise prediction with its input's shape: fix the denoiser or the sample_shape"
        )


def _from_diffusers(
    spec: str,
    prompts: Sequence[str] | None,
    guidance_scale: float | None,
    classes: Sequence[int] | None = None,
    image_size: int | Sequence[int] | None = None,
    true_cfg_scale: float | None = None,
) -> LoadedModel:
    """A diffusers pipeline (model_index.json) or a bare UNet2DModel, local or from the hub."""
    local = Path(spec)
    cache_only: str | None = None  # why a hub id is read from the local cache only (None: local, or online)
    if local.exists():
        index = _read_json(spec, local / "model_index.json")
        cfg = None if index is not None else _read_json(spec, local / "config.json")
    else:
        if spec.startswith((".", "/", "~")) or spec.count("/") != 1 or not _valid_repo_id(spec):
            raise TmpqError(
                f"model {spec!r} not found: it is neither an existing path nor a Hugging Face Hub id "
                f"('namespace/name'); pass {SUPPORTED}"
            )
        cache_only = _hub_cache_only(spec)
        index = _hub_json(spec, "model_index.json", cache_only)
        cfg = None if index is not None else _hub_json(spec, "config.json", cache_only)
    name = index.get("_class_name") if isinstance(index, dict) else None
    if image_size is not None and name != "FluxPipeline":
        raise TmpqError(f"an image size applies to FLUX pipelines only, not to {spec!r} ({name or 'a bare model'})")
    if true_cfg_scale is not None and name != "FluxPipeline":
        raise TmpqError(
            f"a true CFG scale applies to FLUX pipelines only, not to {spec!r} ({name or 'a bare model'}); other "
            "pipelines take --guidance-scale"
        )
    if index is not None:
        if isinstance(index, dict) and index.get("_class_name") == "DiTPipeline":
            return _from_dit_pipeline(spec, index, prompts, guidance_scale, classes, cache_only)
        if classes is not None:
            raise TmpqError(f"classes apply to class-conditional (DiT) pipelines only, not to {spec!r}")
        if name == "FluxPipeline":
            return _from_flux_pipeline(spec, index, prompts, guidance_scale, image_size, cache_only, true_cfg_scale)
        if isinstance(index, dict) and index.get("_class_name") in PIXART_PIPELINES:
            return _from_pixart_pipeline(spec, index, prompts, guidance_scale, cache_only)
        if isinstance(index, dict) and index.get("_class_name") == "StableDiffusion3Pipeline":
            return _from_sd3_pipeline(spec, index, prompts, guidance_scale, cache_only)
        return _from_pipeline(spec, index, prompts, guidance_scale, cache_only)
    if cfg is None:
        if cache_only is not None:
            raise TmpqError(
                f"could not load {spec!r}: {cache_only} and it is not in the local Hugging Face cache; "
                "download it while online, or pass a local directory"
            )
        raise TmpqError(
            f"could not load {spec!r}: it has neither a model_index.json (a diffusers pipeline) nor a "
            f"config.json (a diffusers model); pass {SUPPORTED}"
        )
    if prompts is not None or guidance_scale is not None:
        raise TmpqError(f"prompts and a guidance scale apply to text-to-image pipelines only, not to {spec!r}")
    if not isinstance(cfg, dict) or cfg.get("_class_name") != "UNet2DModel":
        name = cfg.get("_class_name") if isinstance(cfg, dict) else type(cfg).__name__
        raise TmpqError(f"{spec!r} holds a {name}, not a UNet2DModel; pass {SUPPORTED}")
    schedule, notes = _schedule(spec, None, cache_only)
    unet = _component(spec, None, "diffusers", "UNet2DModel", cache_only)
    den = UNetDenoiser(unet.eval(), schedule).eval()
    return LoadedModel(den, schedule, den.sample_shape, spec, _weights(local, None), notes + _cache_note(cache_only))


def _read_json(spec: str, path: Path):
    """A config file of a model directory, parsed (None: no such file); broken JSON is named as such, not taken for
    a missing file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TmpqError(
            f"{spec!r}: {path.name} is not valid JSON ({e}); repair it or re-save the model with save_pretrained"
        ) from None
    except OSError as e:
        raise TmpqError(f"{spec!r}: cannot read {path} ({e}); check the file's permissions") from None


def _valid_repo_id(spec: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it at import, or as set since (its constant would miss that)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.upper() in _TRUE


def _hub_cache_only(spec: str) -> str | None:
    """Why `spec` must come from the local cache (None: the Hub answered). One quick request decides it: without
    it, huggingface_hub retries every file for ~25 s when the network is down before a misleading error."""
    if _hub_offline():
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(spec, "model_index.json"), timeout=_HUB_TIMEOUT_S)
    except GatedRepoError:
        raise TmpqError(
            f"could not load {spec!r}: it is a gated repository; accept its terms on https://huggingface.co/{spec} "
            "and log in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise TmpqError(
            f"could not load {spec!r}: there is no such repository on the Hugging Face Hub (or it is private: log "
            "in with `hf auth login`); check the id or pass a local directory"
        ) from None
    except EntryNotFoundError:
        return None  # the repository exists but is no pipeline: a bare model, read below
    except Exception:  # no network, proxy, SSL or a Hub outage (their error types vary by transport): use the cache
        return "the Hugging Face Hub cannot be reached"
    return None


def _hub_json(spec: str, filename: str, cache_only: str | None):
    """`filename` at the top of a hub repository, parsed; None where the repository (or the cache) has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        path = hf_hub_download(spec, filename, local_files_only=cache_only is not None)
    except EntryNotFoundError:  # also LocalEntryNotFoundError: not in the cache
        return None
    except (OSError, ValueError) as e:
        raise TmpqError(
            f"could not load {spec!r} from the Hugging Face Hub ({e}); check the id and the network, or pass a "
            "local directory"
        ) from None
    return _read_json(spec, Path(path))


def _cache_note(cache_only: str | None) -> tuple[str, ...]:
    return () if cache_only is None else (f"{cache_only}: loaded from the local Hugging Face cache",)


def _from_pipeline(
    spec: str, index, prompts: Sequence[str] | None, guidance_scale: float | None, cache_only: str | None
) -> LoadedModel:
    """Pixel, latent or text-to-image pipeline: the UNet is the denoiser, the rest stays at full precision."""
    parts = _index_parts(spec, index)
    name = index.get("_class_name")
    unet_class = parts.get("unet", (None, None))[1]
    vae_key = next((k for k in ("vae", "vqvae") if k in parts), None)
    extra = sorted(set(parts) - {"unet", "vae", "vqvae", "text_encoder", "tokenizer", "scheduler"})
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
    _check_components(spec, parts)
    clip = all(parts[k][1].startswith("CLIP") for k in ("text_encoder", "tokenizer")) if text2image else True
    if not clip:
        raise TmpqError(
            f"{spec!r}: a {name} with a UNet2DConditionModel needs a CLIP text encoder and tokenizer; it names "
            f"{parts['text_encoder'][1]} and {parts['tokenizer'][1]}. Supported: {SUPPORTED}"
        )
    schedule, notes = _schedule(spec, "scheduler", cache_only)
    unet = _component(spec, "unet", *parts["unet"], cache_only).eval()
    decoder = LatentDecoder(_component(spec, vae_key, *parts[vae_key], cache_only), key=vae_key) if vae_key else None
    kind = "text2image" if text2image else "latent" if decoder is not None else "pixel"
    common = dict(
        spec=spec,
        weights_path=_weights(Path(spec), "unet"),
        notes=notes + _cache_note(cache_only),
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
        _component(spec, "tokenizer", *parts["tokenizer"], cache_only),
        _component(spec, "text_encoder", *parts["text_encoder"], cache_only),
    )
    g = DEFAULT_GUIDANCE if guidance_scale is None else float(guidance_scale)
    prompts = tuple(prompts) if prompts is not None else read_prompts()
    den = GuidedDenoiser(unet, schedule, text([""]), g).eval()
    options = {"prompts": list(prompts), "guidance_scale": g}
    return LoadedModel(den, schedule, den.sample_shape, **common, text_encoder=text, prompts=prompts, options=options)


def _from_dit_pipeline(
    spec: str,
    index: dict,
    prompts: Sequence[str] | None,
    guidance_scale: float | None,
    classes: Sequence[int] | None,
    cache_only: str | None,
) -> LoadedModel:
    """A class-conditional DiTPipeline: the transformer is the denoiser (with DiTPipeline's guidance), the VAE stays
    at full precision; calibration and fitness cycle over `classes` (default: every class the model knows)."""
    if prompts is not None:
        raise TmpqError(f"{spec!r} is class-conditional (a DiTPipeline): give classes (label ids), not prompts")
    layout = {"transformer": "DiTTransformer2DModel", "vae": None, "scheduler": None}
    _, schedule, notes, transformer, vae = _transformer_pipeline(spec, index, layout, cache_only)
    g = DEFAULT_CLASS_GUIDANCE if guidance_scale is None else float(guidance_scale)
    den = ClassDenoiser(transformer, schedule, g).eval()
    labels, options = _class_conditioning(spec, den, g, classes)
    return LoadedModel(
        den,
        schedule,
        den.sample_shape,
        spec=spec,
        weights_path=_weights(Path(spec), "transformer"),
        notes=notes + _cache_note(cache_only),
        kind="class2image",
        decoder=LatentDecoder(vae, key="vae"),
        pipeline_class="DiTPipeline",
        options=options,
        class_labels=labels,
    )


def _from_pixart_pipeline(
    spec: str, index: dict, prompts: Sequence[str] | None, guidance_scale: float | None, cache_only: str | None
) -> LoadedModel:
    """A PixArt-α/Σ pipeline: the transformer is the denoiser (with the pipeline's guidance and prompt masks); the
    VAE and the T5 text encoder stay at full precision."""
    from tmpq.models.denoiser import PixArtDenoiser
    from tmpq.models.parts import prompt_encoder

    name = index["_class_name"]
    layout = {"transformer": "PixArtTransformer2DModel", "vae": None, "scheduler": None}
    layout |= {"text_encoder": "T5EncoderModel", "tokenizer": None}
    parts, schedule, notes, transformer, vae = _transformer_pipeline(spec, index, layout, cache_only)
    text = prompt_encoder({k: _component(spec, k, *parts[k], cache_only) for k in ("tokenizer", "text_encoder")}, name)
    decoder = LatentDecoder(vae, key="vae")
    g = DEFAULT_PIXART_GUIDANCE if guidance_scale is None else float(guidance_scale)
    prompts = tuple(prompts) if prompts is not None else read_prompts()
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    size = transformer.config.sample_size
    den = PixArtDenoiser(transformer, schedule, text([""]), g, (size * f, size * f)).eval()
    notes += ("prompts are lower-cased and stripped; captions are not cleaned",)
    return _text_transformer_model(spec, den, notes + _cache_note(cache_only), decoder, text, prompts, name, g)


def _from_sd3_pipeline(
    spec: str, index: dict, prompts: Sequence[str] | None, guidance_scale: float | None, cache_only: str | None
) -> LoadedModel:
    """A Stable Diffusion 3 pipeline: the transformer is the denoiser (flow matching, the pipeline's guidance), the
    VAE and the text encoders stay at full precision; prompts are encoded by the pipeline's own `encode_prompt`."""
    from tmpq.models.denoiser import SD3Denoiser
    from tmpq.models.parts import prompt_encoder

    name = index["_class_name"]
    texts = {"text_encoder": "CLIPTextModelWithProjection", "tokenizer": None}
    texts |= {"text_encoder_2": "CLIPTextModelWithProjection", "tokenizer_2": None}
    present = _index_parts(spec, index)
    if "text_encoder_3" in present or "tokenizer_3" in present:  # T5 is optional in SD3 pipelines
        texts |= {"text_encoder_3": "T5EncoderModel", "tokenizer_3": None}
    layout = {"transformer": "SD3Transformer2DModel", "vae": None, "scheduler": None, **texts}
    parts, schedule, notes, transformer, vae = _transformer_pipeline(spec, index, layout, cache_only)
    if schedule.prediction_type != "flow":
        raise TmpqError(f"{spec!r}: a {name} needs a FlowMatchEulerDiscreteScheduler; its scheduler config is not one")
    text = prompt_encoder({k: _component(spec, k, *parts[k], cache_only) for k in texts}, name)
    g = DEFAULT_SD3_GUIDANCE if guidance_scale is None else float(guidance_scale)
    prompts = tuple(prompts) if prompts is not None else read_prompts()
    den = SD3Denoiser(transformer, schedule, text([""]), g).eval()
    decoder = LatentDecoder(vae, key="vae")
    return _text_transformer_model(spec, den, notes + _cache_note(cache_only), decoder, text, prompts, name, g)


def _from_flux_pipeline(
    spec: str,
    index: dict,
    prompts: Sequence[str] | None,
    guidance_scale: float | None,
    image_size: int | Sequence[int] | None,
    cache_only: str | None,
    true_cfg_scale: float | None = None,
) -> LoadedModel:
    """A FLUX.1 pipeline (dev or schnell): the transformer is the denoiser (flow matching; FLUX.1-dev's embedded
    guidance; with `true_cfg_scale` > 1, FluxPipeline's true CFG against the negative prompt ""), the VAE and both
    text encoders stay at full precision; prompts are encoded by the pipeline's own `encode_prompt`. The latent size
    follows `image_size` as FluxPipeline's height and width do, and so does the schedule's shift where the scheduler
    shifts by resolution (FLUX.1-dev)."""
    from tmpq.models.denoiser import FluxDenoiser
    from tmpq.models.parts import prompt_encoder

    name = index["_class_name"]
    texts = {"text_encoder": "CLIPTextModel", "tokenizer": None}
    texts |= {"text_encoder_2": "T5EncoderModel", "tokenizer_2": None}
    layout = {"transformer": "FluxTransformer2DModel", "vae": None, "scheduler": None, **texts}

    def tokens(vae) -> int:  # the packed image's token count, which FLUX.1-dev's schedule shift depends on
        h, w = _flux_latent_size(spec, vae, image_size)
        return (h // 2) * (w // 2)

    loaded = _transformer_pipeline(spec, index, layout, cache_only, tokens, "trailing")
    parts, schedule, notes, transformer, vae = loaded
    if schedule.prediction_type != "flow":
        raise TmpqError(f"{spec!r}: a {name} needs a FlowMatchEulerDiscreteScheduler; its scheduler config is not one")
    text = prompt_encoder({k: _component(spec, k, *parts[k], cache_only) for k in texts}, name)
    g = DEFAULT_FLUX_GUIDANCE if guidance_scale is None else float(guidance_scale)
    prompts = tuple(prompts) if prompts is not None else read_prompts()
    latent = _flux_latent_size(spec, vae, image_size)
    tc = 1.0 if true_cfg_scale is None else float(true_cfg_scale)
    uncond = text([""]) if tc > 1.0 else None
    den = FluxDenoiser(transformer, schedule, g, latent, uncond, tc).eval()
    model = _text_transformer_model(
        spec, den, notes + _cache_note(cache_only), LatentDecoder(vae, key="vae"), text, prompts, name, g
    )
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    model.options["image_size"] = [latent[0] * f, latent[1] * f]
    if true_cfg_scale is not None:
        model.options["true_cfg_scale"] = tc
    return model


def _flux_latent_size(spec: str, vae: nn.Module, image_size: int | Sequence[int] | None) -> tuple[int, int]:
    """FluxPipeline's latent (height, width) for an image size in pixels (default: 128 × the VAE's factor): the
    image must be a multiple of the VAE's factor times the 2×2 packing."""
    f = 2 * 2 ** (len(vae.config.block_out_channels) - 1)
    size = FLUX_DEFAULT_SAMPLE_SIZE * f // 2 if image_size is None else image_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < f or v % f for v in hw):
        raise TmpqError(f"{spec!r}: the image size must be one or two multiples of {f} pixels, got {size!r}")
    return (2 * hw[0] // f, 2 * hw[1] // f)


def _text_transformer_model(spec, den, notes, decoder, text, prompts, pipeline_class, g) -> LoadedModel:
    """The LoadedModel of a text-conditioned transformer pipeline (PixArt, SD3, FLUX): its options reload it
    exactly."""
    return LoadedModel(
        den,
        den.schedule,
        den.sample_shape,
        spec=spec,
        weights_path=_weights(Path(spec), "transformer"),
        notes=notes,
        kind="text2image",
        decoder=decoder,
        text_encoder=text,
        prompts=prompts,
        pipeline_class=pipeline_class,
        options={"prompts": list(prompts), "guidance_scale": g},
    )


def _transformer_pipeline(
    spec: str,
    index: dict,
    layout: dict[str, str | None],
    cache_only: str | None,
    image_seq_len: Callable[[nn.Module], int] | None = None,
    spacing: str = "linspace",
) -> tuple:
    """What the transformer pipeline loaders share: exactly the components of `layout`, each of the class it names
    (None: any class tmpq loads there), checked before anything is imported; then the transformer, the VAE and the
    schedule (`image_seq_len(vae)`: the image's token count, for schedules shifted by resolution; `spacing`: how the
    pipeline spaces its N-step schedules, see `FlowSchedule`).
    Returns (parts, schedule, notes, transformer, vae)."""
    parts = _index_parts(spec, index)
    name = index.get("_class_name")
    if set(parts) != set(layout):
        raise TmpqError(
            f"{spec!r} is a {name} with components {sorted(parts)}; tmpq loads a {name} of {sorted(layout)} (missing: "
            f"{sorted(set(layout) - set(parts)) or 'none'}). Supported: {SUPPORTED}"
        )
    _check_components(spec, parts)
    for key, cls in layout.items():
        if cls is not None and parts[key][1] != cls:
            raise TmpqError(
                f"{spec!r}: a {name} needs a {cls} as its {key}; it names {parts[key][1]}. Supported: {SUPPORTED}"
            )
    transformer = _component(spec, "transformer", *parts["transformer"], cache_only).eval()
    vae = _component(spec, "vae", *parts["vae"], cache_only)
    seq_len = image_seq_len(vae) if image_seq_len is not None else None
    schedule, notes = _schedule(spec, "scheduler", cache_only, seq_len, spacing)
    return parts, schedule, notes, transformer, vae


def _index_parts(spec: str, index) -> dict[str, tuple[str, str]]:
    """The components model_index.json lists, as {name: (library, class)}; checked for shape before any is used.
    Keys starting with "_" are metadata and other non-list values pipeline options (requires_safety_checker)."""
    if not isinstance(index, dict):
        raise TmpqError(
            f"{spec!r}: model_index.json holds a {type(index).__name__}, not a JSON object; re-save the pipeline "
            "with save_pretrained"
        )
    parts = {}
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list):
            continue
        if len(value) != 2 or not all(v is None or isinstance(v, str) for v in value):
            raise TmpqError(
                f"{spec!r}: model_index.json gives {key!r} as {value!r}, not [library, class]; repair the entry or "
                "re-save the pipeline with save_pretrained"
            )
        if value[0] is not None and value[1] is not None:  # [null, null]: an absent optional component
            parts[key] = (value[0], value[1])
    return parts


def _check_components(spec: str, parts: dict[str, tuple[str, str]]) -> None:
    """Refuse, before anything is imported, a component whose library or class is not one tmpq loads for it."""
    for key, (library, class_name) in parts.items():
        allowed_library, classes = _COMPONENTS[key]
        fits = class_name in classes if classes else _SCHEDULER_CLASS.fullmatch(class_name) is not None
        if library != allowed_library or not fits:
            want = " or ".join(f"{allowed_library}.{c}" for c in classes) or "a diffusers scheduler"
            raise TmpqError(
                f"{spec!r}: model_index.json names {library}.{class_name} for its {key}; tmpq loads only {want} "
                "there and imports nothing a model directory names otherwise. Fix the entry (or re-save the "
                f"pipeline with diffusers' save_pretrained). Supported: {SUPPORTED}"
            )


def _component(spec: str, subfolder: str | None, library: str, class_name: str, cache_only: str | None = None):
    """One pipeline component through its own library's `from_pretrained` (diffusers or transformers), weights
    from safetensors only: pickle weights (.bin) can run arbitrary code when they are loaded."""
    allowed = {lib for lib, _ in _COMPONENTS.values()}
    if library not in allowed:  # _check_components has refused it already; never import what a file names
        raise TmpqError(f"{spec!r} names the library {library!r} for its {subfolder}; tmpq loads only {allowed}")
    try:
        module = importlib.import_module(library)
    except ImportError:
        raise TmpqError(
            f"{spec!r} needs the {library!r} package for its {subfolder}; install it: pip install 'tmpq[t2i]'"
        ) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise TmpqError(f"{library} has no {class_name} (the {subfolder} of {spec!r}); upgrade {library}")
    kwargs: dict = {"subfolder": subfolder}
    if cache_only is not None:
        kwargs["local_files_only"] = True
    has_weights = isinstance(cls, type) and issubclass(cls, nn.Module)  # a model; a tokenizer has none
    if has_weights:
        _refuse_pickle(spec, Path(spec), subfolder)
        kwargs["use_safetensors"] = True
    try:
        return cls.from_pretrained(spec, **kwargs, **quiet_load_kwargs(cls))
    except (OSError, ValueError) as e:
        if has_weights and not Path(spec).exists() and ".safetensors" in str(e):
            problem = "has no .safetensors weights in its Hub repository"
            raise TmpqError(_pickle_message(spec, subfolder, problem)) from None
        raise TmpqError(f"could not load the {subfolder or 'model'} of {spec!r} ({e})") from None


def _refuse_pickle(spec: str, local: Path, subfolder: str | None) -> None:
    """A local model folder with pickle weights and no safetensors is refused by name (not loaded, not 'missing')."""
    folder = local / (subfolder or "")
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise TmpqError(_pickle_message(spec, subfolder, f"has only pickle weights ({', '.join(pickles)})"))


def _pickle_message(spec: str, subfolder: str | None, problem: str) -> str:
    what = f"the {subfolder} of {spec!r}" if subfolder else repr(spec)
    return (
        f"{what} {problem}; tmpq loads safetensors only, because unpickling weights can run arbitrary code. "
        "Convert it once, from a source you trust: load it with diffusers / transformers and re-save it with "
        "save_pretrained(..., safe_serialization=True), then pass that directory"
    )


def _schedule(
    spec: str,
    subfolder: str | None,
    cache_only: str | None = None,
    image_seq_len: int | None = None,
    spacing: str = "linspace",
) -> tuple[NoiseSchedule | FlowSchedule, tuple[str, ...]]:
    sched = _scheduler_config(spec, subfolder, cache_only)
    if sched is None:
        note = "no scheduler config found: assumed DDPM with T = 1000, linear betas 1e-4..0.02, epsilon"
        return NoiseSchedule.from_scheduler_config({}), (note,)
    if is_flow_config(sched):
        return FlowSchedule.from_scheduler_config(sched, image_seq_len, spacing), ()
    return NoiseSchedule.from_scheduler_config(sched), ()


def _weights(local: Path, subfolder: str | None) -> Path | None:
    if not local.is_dir():
        return None
    found = sorted((local / (subfolder or "")).glob("diffusion_pytorch_model*.safetensors"))
    return found[0] if found else None


def _scheduler_config(spec: str, subfolder: str | None, cache_only: str | None = None) -> dict | None:
    """The scheduler config of a pipeline (its `scheduler/`) or beside a bare model; None when there is none.
    A local file is parsed here (a broken one is an error, not a silent default schedule); a hub id goes through
    `load_config`, diffusers' ConfigMixin (any scheduler class reads it)."""
    from diffusers import DDPMScheduler

    local = Path(spec)
    for sub in [subfolder] if subfolder else [None, "scheduler"]:
        if local.is_dir():
            path = local / (sub or "") / DDPMScheduler.config_name
            cfg = _read_json(spec, path)
            if cfg is not None:
                return _scheduler_dict(spec, cfg)
            continue
        try:
            return dict(DDPMScheduler.load_config(spec, subfolder=sub, local_files_only=cache_only is not None))
        except (OSError, ValueError):
            continue
    return None


def _scheduler_dict(spec: str, cfg) -> dict:
    if not isinstance(cfg, dict):
        raise TmpqError(f"{spec!r}: scheduler_config.json holds a {type(cfg).__name__}, not a JSON object; repair it")
    return cfg
