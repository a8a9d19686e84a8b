"""Where a transformer denoiser spends its MACs: the share of each unit type, per image (both halves of the guided
batch), at the real sizes of DiT-XL/2 (256 px) and PixArt-α (512 px), with random weights (no download needed:
MACs depend on shapes only).

    .venv/bin/python bench/transformer_macs.py                 # DiT-XL/2-256 and PixArt-α-512
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
    ("attention projections", re.compile(r"attn\d\.(to_q|to_k|to_v|to_out\.0)$")),
    ("MLP", re.compile(r"\.ff\.")),
    ("adaLN + embedders", re.compile(r"norm1\.linear|adaln_single|timestep_embedder|caption_projection|emb\.")),
    ("patch embedding", re.compile(r"pos_embed\.proj$")),
    ("final projection", re.compile(r"proj_out")),
)


def _kind(name: str) -> str:
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


def main(tiny: bool = typer.Option(False, help="the tiny test models instead of the real sizes")) -> None:
    torch.manual_seed(0)
    print("| model | unit type | units | MMACs / image | share |")
    print("|---|---|---:|---:|---:|")
    models = (
        (("tiny DiT", _dit), ("tiny PixArt", _pixart)) if tiny else (("DiT-XL/2-256", _dit), ("PixArt-α-512", _pixart))
    )
    for label, build in models:
        den, cond = build(tiny)
        x = torch.randn(1, *den.sample_shape)
        t = torch.tensor([500])
        sn = SuperNet.wrap(den, QuantSpec(), (x, t, cond))
        total = sum(u.macs for u in sn.units.values())
        by: dict[str, list[int]] = {}
        for name, u in sn.units.items():
            entry = by.setdefault(_kind(name), [0, 0])
            entry[0] += 1
            entry[1] += u.macs
        name = label
        for kind, (n, macs) in sorted(by.items(), key=lambda kv: -kv[1][1]):
            print(f"| {name} | {kind} | {n} | {macs / 1e6:,.2f} | {100 * macs / total:.1f} % |")
        print(f"| {name} | **total** | {len(sn.units)} | {total / 1e6:,.2f} | 100 % |")
        del sn, den


if __name__ == "__main__":
    typer.run(main)
