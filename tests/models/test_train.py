from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_pipelines import tiny_dit_recipe

from tmpq.errors import TmpqError
from tmpq.models.builtin import load_trained
from tmpq.models.train import TrainConfig, train_ddpm, write_model_card
from tmpq.provenance import file_sha256


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
    unet = load_trained(path)
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


def test_loss_readout_interval_does_not_change_the_weights(tmp_path):
    """Reading the loss back rarely (fewer host syncs) is a speed choice only: the weights are bit-identical."""
    every = train_ddpm(_images(), tmp_path / "a", replace(_cfg(5), log_every=1), progress=False)
    rarely = train_ddpm(_images(), tmp_path / "b", replace(_cfg(5), log_every=4), progress=False)
    a, b = load_file(str(every)), load_file(str(rarely))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_deeper_blocks_train_and_record_speed(tmp_path):
    cfg = replace(_cfg(2), layers_per_block=2)
    path = train_ddpm(_images(), tmp_path / "run", cfg, progress=False)
    assert load_trained(path).config.layers_per_block == 2
    card = write_model_card(path, "tmpq train").read_text()
    assert "it/s" in card and "torch threads" in card  # the machine and the speed are named
    # re-running the finished command trains nothing: the card keeps the speed of the session that trained
    again = write_model_card(train_ddpm(_images(), tmp_path / "run", cfg, progress=False), "tmpq train").read_text()
    speed = [line for line in again.splitlines() if "it/s" in line]
    assert speed and "nan" not in speed[0] and "in the last session that trained" in speed[0]


def test_run_dir_from_before_new_options_resumes(tmp_path):
    """A run directory whose stored config predates an option reads it at its default instead of refusing."""
    train_ddpm(_images(), tmp_path / "run", _cfg(2), progress=False)
    path = tmp_path / "run" / "train_config.json"
    stored = json.loads(path.read_text())
    del stored["layers_per_block"], stored["log_every"]
    path.write_text(json.dumps(stored))
    with pytest.raises(TmpqError, match="different config"):
        train_ddpm(_images(), tmp_path / "run", replace(_cfg(2), layers_per_block=2), progress=False)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2
    train_ddpm(_images(), tmp_path / "run", _cfg(2), progress=False)  # the same recipe: accepted


@pytest.mark.parametrize(
    "bad", [{"lr": 0.0}, {"lr": float("nan")}, {"ema_decay": 1.0}, {"log_every": 0}, {"layers_per_block": 0}]
)
def test_bad_training_options_are_refused(bad):
    with pytest.raises(TmpqError):
        replace(_cfg(2), **bad)


def test_snapshot_of_a_run_equals_its_exported_weights(tmp_path):
    from tmpq.models.train import snapshot_ema

    path = train_ddpm(_images(), tmp_path / "run", _cfg(4), progress=False)
    snap = snapshot_ema(tmp_path / "run", tmp_path / "snap.safetensors")
    a, b = load_file(str(path)), load_file(str(snap))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TmpqError, match="no training checkpoint"):
        snapshot_ema(tmp_path / "nothing", tmp_path / "x.safetensors")


def _dit_cfg(steps: int) -> TrainConfig:
    return tiny_dit_recipe(steps=steps, checkpoint_every=2, class_dropout=0.5)


def _labels(n: int = 32) -> torch.Tensor:
    return torch.arange(n) % 10


def test_killed_dit_training_resumes_exactly_and_loads_as_a_dit(tmp_path):
    straight = train_ddpm(_images(), tmp_path / "a", _dit_cfg(6), progress=False, labels=_labels())
    train_ddpm(_images(), tmp_path / "b", _dit_cfg(6), max_minutes=0, progress=False, labels=_labels())
    resumed = train_ddpm(_images(), tmp_path / "b", _dit_cfg(6), progress=False, labels=_labels())
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and straight.name == "dit_ema.safetensors"
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    dit = load_trained(straight)
    assert type(dit).__name__ == "DiTTransformer2DModel" and dit.config.num_embeds_ada_norm == 10
    assert dit.config.patch_size == 8 and dit.config.out_channels == 1
    card = write_model_card(straight, "tmpq train --arch dit").read_text()
    assert "`DiTTransformer2DModel`" in card and "class-conditional, 50% of labels dropped" in card


def test_dit_training_learns_from_the_labels_and_needs_them(tmp_path):
    """The labels reach the model (other labels, other weights), and a DiT without labels is refused."""
    ones = train_ddpm(_images(), tmp_path / "a", _dit_cfg(2), progress=False, labels=_labels())
    other = train_ddpm(_images(), tmp_path / "b", _dit_cfg(2), progress=False, labels=(_labels() + 1) % 10)
    a, b = load_file(str(ones)), load_file(str(other))
    assert any(not torch.equal(a[k], b[k]) for k in a if "class_embedder" in k)
    with pytest.raises(TmpqError, match="one class label per training image"):
        train_ddpm(_images(), tmp_path / "c", _dit_cfg(2), progress=False)
    assert not (tmp_path / "c").exists()


def test_label_dropout_is_seeded_per_step_and_shared_by_every_block():
    from tmpq.models.train import _BatchDraws

    cfg = replace(_dit_cfg(2), class_dropout=0.25)
    draws = _BatchDraws(4096, cfg, 1000, torch.device("cpu"))
    labels = torch.arange(4096) % 10
    first = draws.labels(3, labels)
    assert torch.equal(first, draws.labels(3, labels)) and not torch.equal(first, draws.labels(4, labels))
    dropped = first == 10
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    assert torch.equal(first[~dropped], labels[~dropped])


@pytest.mark.parametrize(
    "bad", [{"architecture": "vit"}, {"patch_size": 3}, {"class_dropout": 1.0}, {"transformer_layers": 0}]
)
def test_bad_dit_options_are_refused(bad):
    with pytest.raises(TmpqError):
        replace(_dit_cfg(2), **bad)


def test_a_run_started_from_weights_continues_them_and_says_so(tmp_path):
    """--init-from: the new run starts at the given weights (one step at a negligible learning rate keeps them), a
    seeded start does not; the weights record the file's checksum and the card names it."""
    first = train_ddpm(_images(), tmp_path / "a", _cfg(4), progress=False)
    cont = replace(_cfg(1), lr=1e-12, warmup_steps=0, init_from=str(first))
    second = train_ddpm(_images(), tmp_path / "b", cont, progress=False)
    fresh = train_ddpm(_images(), tmp_path / "c", replace(cont, init_from=""), progress=False)
    a, b, c = load_file(str(first)), load_file(str(second)), load_file(str(fresh))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    assert max((c[k] - a[k]).abs().max().item() for k in a) > 1e-4  # 2e-3: four steps from the seeded start
    with safe_open(str(second), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["init_sha256"] == file_sha256(first) and meta["init_steps_done"] == "4"
    card = write_model_card(second, "tmpq train --init-from a.safetensors").read_text()
    assert f"Started from: `{first}`" in card and "4 steps" in card
    # A resumed continuation restores from its checkpoint and keeps recording what it started from.
    resumed = train_ddpm(_images(), tmp_path / "b", cont, progress=False)
    with safe_open(str(resumed), framework="pt") as fh:
        assert fh.metadata()["init_sha256"] == file_sha256(first)


def test_starting_from_other_weights_is_refused_before_the_run_exists(tmp_path):
    first = train_ddpm(_images(), tmp_path / "a", _cfg(2), progress=False)
    wider = replace(_cfg(2), block_out_channels=(8, 32), init_from=str(first))
    with pytest.raises(TmpqError, match="not the network this run trains"):
        train_ddpm(_images(), tmp_path / "b", wider, progress=False)
    with pytest.raises(TmpqError, match="--init-from: model file .* not found"):
        train_ddpm(_images(), tmp_path / "c", replace(_cfg(2), init_from=str(tmp_path / "none.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"not weights")
    with pytest.raises(TmpqError, match="--init-from: .* not a readable safetensors"):
        train_ddpm(_images(), tmp_path / "d", replace(_cfg(2), init_from=str(tmp_path / "junk.safetensors")))
    assert not any((tmp_path / d).exists() for d in "bcd")
