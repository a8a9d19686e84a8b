"""Tests about the shipped files themselves (weights and card)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tmpq.errors import TmpqError
from tmpq.models import loading
from tmpq.models.builtin import (
    BUILTIN_DIT,
    BUILTIN_DIT_GUIDANCE,
    BUILTIN_DIT_SCHEDULE,
    BUILTIN_UNET,
    builtin_dit_config,
    builtin_unet_config,
    load_trained,
)
from tmpq.models.loading import load_model
from tmpq.sampling.conditioning import Conditioning


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


def load_trained_meta(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata() or {}


def test_shipped_dit_loads_class_conditional_with_its_config_and_card():
    """builtin:fashion-dit is the DiT `tmpq train --arch dit` builds with the recipe on its card, conditioned on the
    10 Fashion-MNIST classes with its default guidance; the labels change its output."""
    loaded = load_model("builtin:fashion-dit")
    assert loaded.kind == "class2image" and loaded.sample_shape == (1, 32, 32) and loaded.decoder is None
    assert loaded.class_labels == tuple(range(10)) and loaded.options == {"guidance_scale": BUILTIN_DIT_GUIDANCE}
    cfg = dict(loaded.denoiser.unet.config)
    card = BUILTIN_DIT.with_suffix(".md").read_text()
    train = json.loads(load_trained_meta(BUILTIN_DIT)["train_config"])
    want = builtin_dit_config(
        train["patch_size"], train["transformer_layers"], train["attention_heads"], train["head_dim"]
    )
    assert {k: cfg[k] for k in want} == want and train["architecture"] == "dit"
    assert "tmpq train --arch dit" in card and "Wall time" in card and "class-conditional" in card
    assert loaded.schedule == load_model(str(BUILTIN_DIT)).schedule == BUILTIN_DIT_SCHEDULE  # the file agrees
    x, t = torch.zeros(2, 1, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        eps = loaded.denoiser(x, t, loaded.conditioning(2))
        other = loaded.denoiser(x, t, Conditioning.cycle(torch.tensor([5, 7]), 2))
    assert eps.shape == (2, 1, 32, 32) and torch.isfinite(eps).all() and not torch.equal(eps, other)


def test_missing_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(TmpqError, match="not found"):
        load_model(str(tmp_path / "missing.safetensors"))
    with pytest.raises(TmpqError, match="unknown built-in"):
        load_model("builtin:cifar")
    monkeypatch.setitem(loading.BUILTINS, "builtin:fashion-dit", tmp_path / "fashion_dit.safetensors")
    with pytest.raises(
        TmpqError, match=r"missing from this install; .* command in their model card \(fashion_dit.md\)"
    ):
        load_model("builtin:fashion-dit")


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(BUILTIN_UNET.read_bytes()[:1000])
    with pytest.raises(TmpqError, match="not a readable safetensors"):
        load_trained(bad)
    other = tmp_path / "model.ckpt"
    other.write_bytes(b"x")
    with pytest.raises(TmpqError, match="not a supported model"):
        load_model(str(other))
