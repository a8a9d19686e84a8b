from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tmpq.errors import TmpqError
from tmpq.models.builtin import load_unet_safetensors
from tmpq.models.train import TrainConfig, train_ddpm, write_model_card


def _images(n: int = 32) -> torch.Tensor:
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _cfg(steps: int) -> TrainConfig:
    return TrainConfig(
        steps=steps, batch_size=8, block_out_channels=(8, 16), checkpoint_every=2, warmup_steps=1, autocast="off"
    )


def test_killed_training_resumes_exactly(tmp_path):
    straight = train_ddpm(_images(), tmp_path / "a", _cfg(6), progress=False)
    # Stop after the first checkpoint (max_minutes=0), then resume with the same command.
    train_ddpm(_images(), tmp_path / "b", _cfg(6), max_minutes=0, progress=False)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 2
    resumed = train_ddpm(_images(), tmp_path / "b", _cfg(6), progress=False)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def test_trained_weights_load_and_carry_a_card(tmp_path):
    path = train_ddpm(_images(), tmp_path / "run", _cfg(2), progress=False)
    unet = load_unet_safetensors(path)
    assert list(unet.config.block_out_channels) == [8, 16]
    card = write_model_card(path, "tmpq train --steps 2").read_text()
    assert "tmpq train --steps 2" in card and "2 steps of 2 planned" in card


def test_resume_with_other_config_is_refused(tmp_path):
    train_ddpm(_images(), tmp_path / "run", _cfg(2), progress=False)
    with pytest.raises(TmpqError, match="different config"):
        train_ddpm(_images(), tmp_path / "run", _cfg(4), progress=False)
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["steps"] == 2


def test_too_few_images_for_batch(tmp_path):
    with pytest.raises(TmpqError, match="batch size"):
        train_ddpm(_images(4), tmp_path / "run", _cfg(2), progress=False)
