"""Bring your own model: diffusers pipelines and models (local dirs, the same code path as hub ids), prediction
types and beta schedules from the scheduler config, `module:factory` denoisers, clear errors otherwise."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from typer.testing import CliRunner

import tmpq
from tmpq.cli import app
from tmpq.errors import TmpqError
from tmpq.models.loading import load_model
from tmpq.sampling.schedules import NoiseSchedule


def rgb_unet(out_mult: int = 1) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3 * out_mult,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    ).eval()


@pytest.fixture(scope="module")
def v_pipeline(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    DDPMPipeline(unet=rgb_unet(), scheduler=sched).save_pretrained(d)
    return d


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_from_scheduler_config_is_bit_identical(beta_schedule):
    d = DDPMScheduler(beta_schedule=beta_schedule, beta_start=1e-4, beta_end=0.02)
    assert torch.equal(NoiseSchedule.from_scheduler_config(dict(d.config)).alphas_cumprod, d.alphas_cumprod)


def test_pipeline_dir_loads_with_its_schedule_and_v_prediction_becomes_epsilon(v_pipeline):
    loaded = load_model(str(v_pipeline))
    assert loaded.schedule.beta_schedule == "squaredcos_cap_v2" and loaded.schedule.prediction_type == "v_prediction"
    assert loaded.sample_shape == (3, 16, 16) and loaded.weights_path is not None
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        v = loaded.denoiser.unet(x, t).sample
        eps = loaded.denoiser(x, t)
    a = loaded.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = a.sqrt() * x - (1 - a).sqrt() * v  # diffusers' v-prediction definition of x0
    assert torch.allclose(x, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5)


def test_sample_and_x0_prediction_and_learned_variance(tmp_path):
    d = tmp_path / "p"
    DDPMPipeline(unet=rgb_unet(out_mult=2), scheduler=DDPMScheduler(prediction_type="sample")).save_pretrained(d)
    loaded = load_model(str(d))
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([300])
    with torch.no_grad():
        x0 = loaded.denoiser.unet(x, t).sample[:, :3]
        eps = loaded.denoiser(x, t)
    a = loaded.schedule.alphas_cumprod[300]
    assert eps.shape == x.shape and torch.allclose(eps, (x - a.sqrt() * x0) / (1 - a).sqrt(), atol=1e-5)


def test_bare_model_dir_assumes_a_default_schedule_and_says_so(tmp_path):
    rgb_unet().save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.schedule == NoiseSchedule() and "assumed DDPM" in loaded.notes[0]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"transformer": ["diffusers", "DiTTransformer2DModel"], "unet": None}, "non-UNet denoiser"),
        ({"unet": ["diffusers", "UNet2DConditionModel"]}, "no text_encoder"),
        ({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}, "not supported"),
        ({"text_encoder": ["transformers", "CLIPTextModel"]}, "unconditional UNet2DModel"),
    ],
)
def test_unsupported_pipelines_name_what_is_supported(v_pipeline, tmp_path, edit, message):
    import shutil

    d = tmp_path / "p"
    shutil.copytree(v_pipeline, d)
    index = json.loads((d / "model_index.json").read_text())
    index.update(edit)
    (d / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if v is not None}))
    with pytest.raises(TmpqError, match=message) as e:
        load_model(str(d))
    assert "Supported:" in str(e.value) and "UNet2DConditionModel" in str(e.value)


def test_factory_models_and_bad_specs(monkeypatch, tmp_path):
    loaded = load_model("toy_models:tiny")
    assert loaded.sample_shape == (1, 8, 8) and loaded.denoiser(torch.zeros(1, 1, 8, 8), torch.tensor([5])).shape
    with pytest.raises(TmpqError, match="must return"):
        load_model("toy_models:bad")
    with pytest.raises(TmpqError, match="cannot be imported"):
        load_model("no_such_module:fn")
    with pytest.raises(TmpqError, match="not found"):
        load_model(str(tmp_path / "missing"))
    import diffusers.utils.constants
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network wait: the constants are read at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(diffusers.utils.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(TmpqError, match="could not load"):
        load_model("no-such-org/no-such-model")  # a hub id: diffusers' own loader, offline here


def test_pipeline_search_export_load_sample_end_to_end(v_pipeline, tmp_path):
    """An RGB v-prediction pipeline through the CLI: the classifier FID does not fit it, the pixel proxy does."""
    runner = CliRunner()
    run = tmp_path / "run"
    base = ["search", "--model", str(v_pipeline), "--run-dir", str(run), "--like", "W8A8", "--budget-steps", "3"]
    base += ["--steps", "3", "--generations", "2", "--population", "4", "--calib-samples", "2", "--calib-steps", "3"]
    base += ["--w-bits", "4,8", "--a-bits", "8", "--fitness-samples", "4"]
    res = runner.invoke(app, base)
    assert res.exit_code == 2 and "--proxy-space pixels" in res.output
    res = runner.invoke(app, [*base, "--fitness", "proxy", "--proxy-space", "pixels", "--final-samples", "0"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "exp"
    assert runner.invoke(app, ["export", "--run-dir", str(run), "--out", str(out)]).exit_code == 0
    loaded = tmpq.load(out)
    assert loaded.schedule.prediction_type == "v_prediction" and loaded.sample_shape == (3, 16, 16)
    assert torch.equal(loaded.sample(3, seed=1), tmpq.sampler_from_run(run).sample(3, seed=1))
