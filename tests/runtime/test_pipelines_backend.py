"""Runtime backends on latent and text-to-image exports: prompts, guidance and FP decoding carry over."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import save_latent_pipeline, save_text2image_pipeline
from typer.testing import CliRunner

import tmpq
from tmpq.cli import app

SEARCH = ["--like", "W8A8", "--budget-steps", "3", "--steps", "3", "--generations", "1", "--population", "4"]
SEARCH += ["--calib-samples", "2", "--calib-steps", "3", "--w-bits", "4,8", "--a-bits", "8", "--fitness-samples", "4"]
SEARCH += ["--fitness", "proxy", "--proxy-space", "pixels", "--final-samples", "0"]
SEARCH += ["--lever", "joint", "--recon-iters", "4"]  # mixed bits in the export; BRECQ, cheaply


def _export(model_dir, tmp_path, *extra) -> object:
    runner = CliRunner()
    run, out = tmp_path / "run", tmp_path / "exp"
    res = runner.invoke(app, ["search", "--model", str(model_dir), "--run-dir", str(run), *extra, *SEARCH])
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["export", "--run-dir", str(run), "--out", str(out)]).exit_code == 0
    return out


@pytest.fixture(scope="module")
def t2i_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd")
    return _export(save_text2image_pipeline(d / "pipe"), d, "--guidance-scale", "3")


@pytest.fixture(scope="module")
def latent_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("ldm")
    return _export(save_latent_pipeline(d / "pipe"), d)


def test_text2image_on_backends_keeps_prompts_and_guidance(t2i_export):
    ref = tmpq.load(t2i_export)
    packed = tmpq.load(t2i_export).lower("packed", inplace=True)
    int8 = tmpq.load(t2i_export).lower("int8", inplace=True)
    a = ref.sample(2, seed=0, prompts=["a red car"])
    assert torch.equal(packed.sample(2, seed=0, prompts=["a red car"]), a)  # same arithmetic, guidance, decoder
    b = int8.sample(2, seed=0, prompts=["a red car"])
    assert b.shape == a.shape and (a - b).abs().mean() < 0.1 * a.abs().mean()
    other = int8.sample(2, seed=0, prompts=["a blue sky"])
    assert (b - other).abs().mean() > 1e-3  # the prompt still matters
    assert any("int8 kernel" in k for k in int8.summary()["mac_share"])


def test_latent_on_backends_decodes(latent_export):
    ref = tmpq.load(latent_export)
    fast = tmpq.load(latent_export).lower("packed", inplace=True)
    assert torch.equal(fast.sample(2, seed=1), ref.sample(2, seed=1))
    assert fast.sample(2, seed=1, decode=False).shape[1:] == tuple(ref.sample_shape)
