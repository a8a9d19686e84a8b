"""Save a seeded, randomly initialised diffusers UNet2DModel (+ DDPM scheduler config) of a chosen width, to time
backends on models larger than the built-in one (timing does not depend on the weights' values).

    .venv/bin/python bench/random_unet.py --channels 64,128,256 --out runs/unet_wide
    .venv/bin/python bench/speed.py --model runs/unet_wide --run-dir runs/speed_wide --out runs/speed_wide
"""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from diffusers import DDPMScheduler, UNet2DModel


def main(
    channels: str = "64,128,256",
    size: int = 32,
    in_channels: int = 1,
    seed: int = 0,
    out: Path = Path("runs/unet_wide"),
) -> None:
    ch = [int(c) for c in channels.split(",")]
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=ch,
        down_block_types=["DownBlock2D"] * (len(ch) - 1) + ["AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D"] + ["UpBlock2D"] * (len(ch) - 1),
        norm_num_groups=min(32, ch[0]),
    )
    unet.save_pretrained(out)
    DDPMScheduler().save_pretrained(out)
    n = sum(p.numel() for p in unet.parameters())
    typer.echo(f"wrote {out}: UNet2DModel {ch}, {n / 1e6:.2f} M parameters")


if __name__ == "__main__":
    typer.run(main)
