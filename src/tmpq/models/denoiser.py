"""One denoiser interface, `eps = denoiser(x_t, t)`, over the model kinds tmpq accepts."""

from __future__ import annotations

import torch
from torch import nn

from tmpq.errors import TmpqError


class UNetDenoiser(nn.Module):
    """Adapts a diffusers UNet2DModel (returns an output object) to a plain epsilon callable."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        if not isinstance(unet, UNet2DModel):
            raise TmpqError(f"expected a diffusers UNet2DModel, got {type(unet).__name__}")
        pred = getattr(unet.config, "prediction_type", None) or "epsilon"
        if pred != "epsilon":
            raise TmpqError(f"only epsilon-prediction UNets are supported here, this one predicts {pred!r}")
        self.unet = unet
        self.sample_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise TmpqError(
                f"input of shape {tuple(x.shape[1:])} does not match the model's {self.sample_shape}; "
                "resize or pad the images to the model's size"
            )
        return self.unet(x, t).sample
