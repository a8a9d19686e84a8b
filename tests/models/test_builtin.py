"""Tests about the shipped files themselves (weights and card)."""

from __future__ import annotations

import pytest
import torch

from tmpq.errors import TmpqError
from tmpq.models.builtin import BUILTIN_UNET, builtin_unet_config, load_trained
from tmpq.models.loading import load_model


def test_shipped_unet_loads_with_its_config_and_card():
    loaded = load_model("builtin:fashion")
    assert loaded.sample_shape == (1, 32, 32)
    cfg = loaded.denoiser.unet.config
    assert list(cfg.block_out_channels) == builtin_unet_config()["block_out_channels"]
    card = BUILTIN_UNET.with_suffix(".md").read_text()
    assert "tmpq train" in card and "Wall time" in card
    with torch.no_grad():
        eps = loaded.denoiser(torch.zeros(2, 1, 32, 32), torch.tensor([10, 900]))
    assert eps.shape == (2, 1, 32, 32) and torch.isfinite(eps).all()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(TmpqError, match="not found"):
        load_model(str(tmp_path / "missing.safetensors"))
    with pytest.raises(TmpqError, match="unknown built-in"):
        load_model("builtin:cifar")


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(BUILTIN_UNET.read_bytes()[:1000])
    with pytest.raises(TmpqError, match="not a readable safetensors"):
        load_trained(bad)
    other = tmp_path / "model.ckpt"
    other.write_bytes(b"x")
    with pytest.raises(TmpqError, match="not a supported model"):
        load_model(str(other))
