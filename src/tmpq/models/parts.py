"""The full-precision parts of a pipeline around its denoiser: the latent autoencoder and the text encoder.

They are never quantized, searched or fingerprinted with the denoiser: they are not submodules of it, so the
super-network cannot reach them. Each does one job: turn latents into images, or prompts into embeddings.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tmpq.device import module_device
from tmpq.errors import TmpqError
from tmpq.models.builtin import ASSETS

DEFAULT_PROMPTS = "prompts.txt"
"""A small default prompt list shipped in tmpq/assets (calibration and fitness of text-to-image models)."""


class LatentDecoder:
    """A diffusers VAE / VQ-VAE decoding latents to images in [-1, 1], as the pipeline does: divide by the
    scaling factor (add the shift factor where the VAE has one), then `decode(...).sample`."""

    def __init__(self, vae: nn.Module, key: str = "vae", batch_size: int = 16) -> None:
        self.vae = vae.eval()
        self.key = key  # the pipeline's name for it: 'vae' (Stable Diffusion) or 'vqvae' (LDMPipeline)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.batch_size = batch_size

    def to(self, device: torch.device | str) -> LatentDecoder:
        self.vae.to(device)
        return self

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        out = []
        device = module_device(self.vae)
        for i in range(0, len(latents), self.batch_size):  # a large VAE decodes a few images at a time
            z = latents[i : i + self.batch_size].to(device) / self.scaling_factor + self.shift_factor
            out.append(self.vae.decode(z).sample.clamp(-1, 1).cpu())
        return torch.cat(out)


class TextEncoder:
    """A tokenizer + text encoder (CLIP in Stable Diffusion) giving the (P, tokens, width) prompt embeddings the
    UNet cross-attends to: the encoder's last hidden state, padded to the tokenizer's max length, as diffusers'
    StableDiffusionPipeline encodes prompts."""

    def __init__(self, tokenizer, text_encoder: nn.Module) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()

    def to(self, device: torch.device | str) -> TextEncoder:
        self.text_encoder.to(device)
        return self

    def components(self) -> dict[str, object]:
        """The pipeline components this encoder is made of, by their pipeline names (export and to_diffusers)."""
        return {"text_encoder": self.text_encoder, "tokenizer": self.tokenizer}

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str) or not prompts:
            raise TmpqError("give a non-empty list of prompts (a single prompt as a one-item list)")
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(module_device(self.text_encoder)))[0].float()


class MaskedTextEncoder(TextEncoder):
    """A T5 tokenizer + encoder as PixArt-α/Σ encode prompts: lower-cased and stripped (the pipelines' text
    preprocessing without caption cleaning), padded to `max_length` tokens, encoded with the attention mask.

    The transformer attends only to the prompt's real tokens, so the mask travels with the embeddings: each row of
    the table is (tokens, width + 1), the embedding with the mask as its last channel (what `PixArtDenoiser` reads).
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, max_length: int) -> None:
        super().__init__(tokenizer, text_encoder)
        self.max_length = int(max_length)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str) or not prompts:
            raise TmpqError("give a non-empty list of prompts (a single prompt as a one-item list)")
        tokens = self.tokenizer(
            [p.lower().strip() for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        device = module_device(self.text_encoder)
        mask = tokens.attention_mask.to(device)
        emb = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].float()
        return torch.cat([emb, mask.unsqueeze(-1).float()], dim=-1)


class _PipelinePromptEncoder:
    """Text encoders run through their pipeline's own `encode_prompt` (a pipeline of just the text parts), so prompts
    are encoded exactly as the pipeline encodes them: the (tokens, width) embeddings and a pooled vector.

    Both travel in one table row of (tokens + 1, width): the embeddings, then the pooled vector (zero-padded to the
    width) as the last row (what the denoiser reads)."""

    pipeline_class = ""  # the diffusers pipeline whose encode_prompt is used
    components_of_pipeline: tuple[str, ...] = ()  # its other components (given as None)

    def __init__(self, components: dict[str, object], max_sequence_length: int) -> None:
        import diffusers

        self.parts = {k: v for k, v in components.items() if v is not None}
        self.max_sequence_length = int(max_sequence_length)
        none = {k: None for k in self.components_of_pipeline}
        self._pipe = getattr(diffusers, self.pipeline_class)(**(none | self.parts))
        self._pipe.set_progress_bar_config(disable=True)

    def to(self, device: torch.device | str) -> _PipelinePromptEncoder:
        for v in self.parts.values():
            if isinstance(v, nn.Module):
                v.to(device)
        return self

    def components(self) -> dict[str, object]:
        return dict(self.parts)

    def _encode(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str) or not prompts:
            raise TmpqError("give a non-empty list of prompts (a single prompt as a one-item list)")
        emb, pooled = self._encode(list(prompts), module_device(self.parts["text_encoder"]))
        width = max(emb.shape[-1], pooled.shape[-1])
        emb = torch.nn.functional.pad(emb.float(), (0, width - emb.shape[-1]))
        pooled = torch.nn.functional.pad(pooled.float(), (0, width - pooled.shape[-1]))
        return torch.cat([emb, pooled[:, None]], dim=1)


class SD3TextEncoder(_PipelinePromptEncoder):
    """Stable Diffusion 3's three text encoders (CLIP-L and CLIP-G with projection, T5 where the pipeline has it):
    the joint embeddings and the pooled projection, as StableDiffusion3Pipeline encodes them."""

    pipeline_class = "StableDiffusion3Pipeline"
    components_of_pipeline = ("transformer", "scheduler", "vae", "text_encoder_3", "tokenizer_3")

    def __init__(self, components: dict[str, object], max_sequence_length: int = 256) -> None:
        super().__init__(components, max_sequence_length)

    def _encode(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        emb, _, pooled, _ = self._pipe.encode_prompt(
            prompts,
            None,
            None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return emb, pooled


class FluxTextEncoder(_PipelinePromptEncoder):
    """FLUX's two text encoders: T5's embeddings (padded to 512 tokens, FluxPipeline's default) and CLIP's pooled
    output, as FluxPipeline encodes them."""

    pipeline_class = "FluxPipeline"
    components_of_pipeline = ("transformer", "scheduler", "vae")

    def __init__(self, components: dict[str, object], max_sequence_length: int = 512) -> None:
        super().__init__(components, max_sequence_length)

    def _encode(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        emb, pooled, _ = self._pipe.encode_prompt(
            prompts, None, device=device, max_sequence_length=self.max_sequence_length
        )
        return emb, pooled


PIPELINE_PROMPT_ENCODERS = {cls.pipeline_class: cls for cls in (SD3TextEncoder, FluxTextEncoder)}


MASKED_PROMPT_LENGTHS = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}
"""The prompt length each pipeline pads to (its `max_sequence_length` default)."""


def prompt_encoder(components: dict[str, object], pipeline_class: str | None):
    """The prompt encoder a pipeline class uses, from its text components by pipeline name: the pipeline's own
    encode_prompt for SD3 and FLUX, masked T5 for PixArt, CLIP's padded last hidden state otherwise."""
    if pipeline_class in PIPELINE_PROMPT_ENCODERS:
        return PIPELINE_PROMPT_ENCODERS[pipeline_class](components)
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    if pipeline_class in MASKED_PROMPT_LENGTHS:
        return MaskedTextEncoder(tokenizer, text_encoder, MASKED_PROMPT_LENGTHS[pipeline_class])
    return TextEncoder(tokenizer, text_encoder)


@dataclass(frozen=True)
class PipelineParts:
    """What a compressed sampler needs besides its denoiser to make images and to become a pipeline again."""

    kind: str = "pixel"  # pixel | latent | text2image
    decoder: LatentDecoder | None = None
    text_encoder: TextEncoder | None = None
    prompts: tuple[str, ...] = ()  # the default prompts (calibration and search used these)
    pipeline_class: str | None = None  # the diffusers pipeline class the model came in, if any
    class_labels: tuple[int, ...] = ()  # a class-conditional model's default labels (calibration and search used these)

    def to(self, device: torch.device | str) -> PipelineParts:
        """The FP decoder and text encoder moved to `device` (in place; returns self)."""
        for part in (self.decoder, self.text_encoder):
            if part is not None:
                part.to(device)
        return self


def read_prompts(path: str | Path | None = None) -> tuple[str, ...]:
    """Prompts, one per line (blank lines and lines starting with # skipped); None: the shipped default list."""
    if path is None:
        text = (ASSETS / DEFAULT_PROMPTS).read_text()
        where = "the shipped default prompts"
    else:
        p = Path(path)
        if not p.is_file():
            raise TmpqError(f"prompt file {p} not found; give a text file with one prompt per line")
        text, where = p.read_text(), str(p)
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
    if not prompts:
        raise TmpqError(f"{where} holds no prompts; write one prompt per line")
    return prompts


def quiet_load_kwargs(cls: type) -> dict:
    """Keyword arguments for `cls.from_pretrained` that keep a diffusers model's load silent: diffusers asks for
    low-memory loading by default and, without `accelerate`, warns on every load that it cannot; tmpq asks for it
    only where `accelerate` is installed, so users see no warning about a package they did not ask for."""
    if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith("diffusers"):
        return {"low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
    return {}
