"""Where a transformer denoiser spends its MACs: the share of each unit type, per image (both halves of a guided
batch), at the real sizes of DiT-XL/2 (256 px), PixArt-α (512 px), Stable Diffusion 3 medium and FLUX.1-dev (1024 px),
with random weights (no download needed: MACs depend on shapes only).

SD3 and FLUX are built with one block of each kind they repeat (SD3: a joint block and its last, context-pre-only
block; FLUX: one double- and one single-stream block) and each unit's MACs are multiplied by how many identical
blocks the real model has (SD3-medium 23 + 1, FLUX.1 19 + 38): exact, because the repeated blocks have the same
shapes, and it keeps a 12B-parameter model within a few GB.

    .venv/bin/python bench/transformer_macs.py                 # DiT-XL/2-256, PixArt-α-512, SD3-medium, FLUX.1-dev
    .venv/bin/python bench/transformer_macs.py --tiny          # the tiny test models (seconds)

Unit types: attention projections (to_q/k/v/out), attention matmuls (q·kᵀ, softmax·v, self and cross), MLP,
adaLN modulation and the timestep/condition embedders, patch embedding, final projection.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
import typer

from tmpq.quant import QuantSpec
from tmpq.quant.supernet import SuperNet
from tmpq.sampling.conditioning import Conditioning
from tmpq.sampling.schedules import NoiseSchedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))

TYPES = (
    ("attention matmuls", re.compile(r"processor\.(qk|av)$")),
    ("attention projections", re.compile(r"attn\d?\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)$")),
    ("MLP", re.compile(r"\.ff(_context)?\.|\.proj_mlp$|single_transformer_blocks\.\d+\.proj_out$")),
    (
        "adaLN + embedders",
        re.compile(
            r"norm1(_context)?\.linear|norm\.linear|norm_out\.linear|adaln_single|timestep_embedder|caption_projection"
            r"|emb\.|time_text_embed|context_embedder"
        ),
    ),
    ("patch embedding", re.compile(r"pos_embed\.proj$|x_embedder$")),
    ("final projection", re.compile(r"proj_out")),
)


def unit_type(name: str) -> str:
    """The unit type of a quantized unit, by its name (TYPES; "other" if none matches)."""
    return next((label for label, rx in TYPES if rx.search(name)), "other")


def _dit(tiny: bool):
    from diffusers import DiTTransformer2DModel

    from tmpq.models.denoiser import ClassDenoiser

    if tiny:
        from tiny_pipelines import tiny_dit

        model = tiny_dit()
    else:  # facebook/DiT-XL-2-256's transformer config
        model = DiTTransformer2DModel(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            num_layers=28,
            sample_size=32,
            patch_size=2,
            num_embeds_ada_norm=1000,
        )
    schedule = NoiseSchedule()  # MACs depend on shapes only
    den = ClassDenoiser(model.eval(), schedule).eval()
    return den, Conditioning(torch.arange(1000), torch.tensor([7]))


def _pixart(tiny: bool):
    from diffusers import PixArtTransformer2DModel

    from tmpq.models.denoiser import PixArtDenoiser

    if tiny:
        from tiny_pipelines import tiny_pixart

        width, size = 16, 8
        model = tiny_pixart()
    else:  # PixArt-alpha/PixArt-XL-2-512x512's transformer config
        width, size = 4096, 64
        model = PixArtTransformer2DModel(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            num_layers=28,
            cross_attention_dim=1152,
            sample_size=size,
            patch_size=2,
            caption_channels=width,
        )
    schedule = NoiseSchedule()  # MACs depend on shapes only
    tokens = 120
    row = torch.cat([torch.randn(1, tokens, width), torch.zeros(1, tokens, 1)], dim=-1)
    row[:, :12, -1] = 1.0  # a 12-token prompt; the rest is padding, as T5 pads to 120
    uncond = row.clone()
    uncond[:, 1:, -1] = 0.0
    den = PixArtDenoiser(model.eval(), schedule, uncond, 4.5, (size * 8, size * 8)).eval()
    return den, Conditioning(row, torch.tensor([0]))


def _sd3(_tiny: bool = False):
    from diffusers import SD3Transformer2DModel

    from tmpq.models.denoiser import SD3Denoiser
    from tmpq.sampling.schedules import FlowSchedule

    # stabilityai/stable-diffusion-3-medium's transformer config, two of its 24 blocks (the last is context-pre-only)
    model = SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    )
    tokens = 77 + 256  # CLIP-L/G and T5 tokens, as StableDiffusion3Pipeline pads them
    row = torch.randn(1, tokens + 1, 4096) * 0.1  # the joint embeddings, then the pooled projection
    den = SD3Denoiser(model.eval(), FlowSchedule(shift=3.0), row, 7.0).eval()
    return den, Conditioning(row, torch.tensor([0])), {"transformer_blocks.0.": 23}


def _flux(_tiny: bool = False):
    from diffusers import FluxTransformer2DModel

    from tmpq.models.denoiser import FluxDenoiser
    from tmpq.sampling.schedules import FlowSchedule

    # black-forest-labs/FLUX.1-dev's transformer config, one double- and one single-stream block (of 19 and 38)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    row = torch.randn(1, 512 + 1, 4096) * 0.1  # 512 T5 tokens, then the pooled CLIP vector
    den = FluxDenoiser(model.eval(), FlowSchedule(shift=3.0), 3.5, (128, 128)).eval()  # 1024 px: 4,096 tokens
    scale = {"transformer_blocks.0.": 19, "single_transformer_blocks.0.": 38}
    return den, Conditioning(row, torch.tensor([0])), scale


def main(tiny: bool = typer.Option(False, help="the tiny test models instead of the real sizes")) -> None:
    torch.manual_seed(0)
    print("| model | unit type | units | MMACs / image | share |")
    print("|---|---|---:|---:|---:|")
    if tiny:
        models = (("tiny DiT", _dit), ("tiny PixArt", _pixart))
    else:
        models = (
            ("DiT-XL/2-256", _dit),
            ("PixArt-α-512", _pixart),
            ("SD3-medium-1024", _sd3),
            ("FLUX.1-dev-1024", _flux),
        )
    for label, build in models:
        built = build(tiny)
        den, cond = built[:2]
        scale = built[2] if len(built) > 2 else {}
        x = torch.randn(1, *den.sample_shape)
        t = torch.tensor([500])
        with torch.no_grad():
            sn = SuperNet.wrap(den, QuantSpec(), (x, t, cond))
        by: dict[str, list[int]] = {}
        for name, u in sn.units.items():
            times = next((k for prefix, k in scale.items() if name.startswith(f"unet.{prefix}")), 1)
            entry = by.setdefault(unit_type(name), [0, 0])
            entry[0] += times
            entry[1] += u.macs * times
        total = sum(macs for _, macs in by.values())
        units = sum(n for n, _ in by.values())
        for kind, (n, macs) in sorted(by.items(), key=lambda kv: -kv[1][1]):
            print(f"| {label} | {kind} | {n} | {macs / 1e6:,.2f} | {100 * macs / total:.1f} % |")
        print(f"| {label} | **total** | {units} | {total / 1e6:,.2f} | 100 % |")
        del sn, den


if __name__ == "__main__":
    typer.run(main)
