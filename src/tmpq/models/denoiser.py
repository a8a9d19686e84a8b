"""One denoiser interface, `eps = denoiser(x_t, t)`, over the model kinds tmpq accepts."""

from __future__ import annotations

import torch
from torch import nn

from tmpq.errors import TmpqError


class UNetDenoiser(nn.Module):
    """Adapts a diffusers UNet2DModel (returns an output object) to a plain epsilon callable.

    A model trained to predict x0 (`sample`) or v is converted to ε with its noise schedule, so the sampler,
    calibration and search see the same quantity whatever the model predicts. A model with learned variance
    (2× output channels) gives its first half (the mean prediction).
    """

    def __init__(self, unet: nn.Module, schedule=None) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        if not isinstance(unet, UNet2DModel):
            raise TmpqError(
                f"expected a diffusers UNet2DModel, got {type(unet).__name__}; tmpq supports pixel-space "
                "UNet2DModel pipelines, tmpq-trained UNets and `module:factory` denoisers"
            )
        self.unet = unet
        self.schedule = schedule
        if schedule is not None and schedule.prediction_type != "epsilon":
            self.prediction_type = schedule.prediction_type
        else:
            self.prediction_type = "epsilon"
        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (unet.config.in_channels, h, w)
        self.learned_variance = unet.config.out_channels == 2 * unet.config.in_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise TmpqError(
                f"input of shape {tuple(x.shape[1:])} does not match the model's {self.sample_shape}; "
                "resize or pad the images to the model's size"
            )
        out = self.unet(x, t).sample
        if self.learned_variance:
            out = out[:, : x.shape[1]]
        if self.prediction_type != "epsilon":
            out = self.schedule.to_epsilon(out, x, t)
        return out
