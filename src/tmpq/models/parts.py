"""The full-precision parts of a pipeline around its denoiser: the latent autoencoder and the text encoder.

They are never quantized, searched or fingerprinted with the denoiser: they are not submodules of it, so the
super-network cannot reach them. Each does one job: turn latents into images, or prompts into embeddings.
"""

from __future__ import annotations

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


MASKED_PROMPT_LENGTHS = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}
"""The prompt length each pipeline pads to (its `max_sequence_length` default)."""


def prompt_encoder(tokenizer, text_encoder: nn.Module, pipeline_class: str | None) -> TextEncoder:
    """The prompt encoder a pipeline class uses: masked T5 for PixArt, CLIP's padded last hidden state otherwise."""
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
