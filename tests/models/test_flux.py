"""FLUX.1 pipelines end to end on tiny random FluxPipelines saved with `save_pretrained` (FluxTransformer2DModel,
CLIP + T5, flow matching; FLUX.1-dev's embedded guidance and resolution-dependent shift, FLUX.1-schnell's fixed
one): loading, packing, the pipeline's own prompt encoding and schedule, and search → export → load → backends →
FluxPipeline."""

from __future__ import annotations

import json

import pytest
import torch
from attention_checks import check_fp_output_and_macs
from tiny_pipelines import edited_copy, save_flux_pipeline
from typer.testing import CliRunner

import tmpq
from tmpq.cli import app
from tmpq.errors import TmpqError
from tmpq.models.loading import load_model
from tmpq.sampling.ddim import DDIMSampler, generate
from tmpq.sampling.schedules import FlowSchedule

runner = CliRunner()
SEARCH = ["--like", "W8A8", "--budget-steps", "4", "--steps", "4", "--generations", "2", "--population", "4"]
SEARCH += ["--calib-samples", "2", "--calib-steps", "4", "--w-bits", "4,8", "--a-bits", "8", "--fitness-samples", "4"]
SEARCH += ["--fitness", "proxy", "--proxy-space", "pixels", "--final-samples", "0", "--device", "cpu"]
SEARCH += ["--lever", "joint", "--recon-iters", "4"]  # mixed bits in the export; BRECQ, cheaply


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_flux_pipeline(tmp_path_factory.mktemp("flux") / "dev")


def _pipe_images(pipe, prompt: str, seed: int, steps: int, g: float, size: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, height=size, width=size, guidance_scale=g, output_type="np",
                generator=gen).images  # fmt: skip


def _mine(m, steps: int, seed: int):
    ts = m.schedule.timesteps("uniform", steps)
    x = generate(m.denoiser, DDIMSampler(m.schedule, ts), 1, m.sample_shape, seed=seed, cond=m.conditioning(1))
    return (m.decode(x) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("dev", [True, False])
def test_a_flux_pipeline_samples_as_diffusers_does(flux_dir, tmp_path, dev):
    from diffusers import FluxPipeline

    d = flux_dir if dev else save_flux_pipeline(tmp_path / "schnell", dev=False)
    m = load_model(str(d), prompts=["a red shirt"], guidance_scale=2.0, image_size=16)
    assert m.kind == "text2image" and m.pipeline_class == "FluxPipeline" and m.sample_shape == (4, 8, 8)
    assert isinstance(m.schedule, FlowSchedule) and m.schedule.spacing == "trailing"
    assert (m.schedule.mu is not None) == dev  # dev: shifted for 16 image tokens; schnell: fixed shift 1
    assert m.prompt_table().shape == (1, 512 + 1, 32)  # T5 tokens, then the pooled CLIP vector
    assert m.options["image_size"] == [16, 16] and m.options["guidance_scale"] == 2.0
    pipe = FluxPipeline.from_pretrained(str(d))
    pipe.set_progress_bar_config(disable=True)
    assert abs(_pipe_images(pipe, "a red shirt", 3, 4, 2.0) - _mine(m, 4, 3)).max() < 1e-5
    if dev:  # the embedded guidance matters on dev (schnell has none)
        assert abs(_pipe_images(pipe, "a red shirt", 3, 4, 5.0) - _mine(m, 4, 3)).max() > 1e-4


def test_the_image_size_sets_the_latents_and_the_shift(flux_dir):
    small = load_model(str(flux_dir), image_size=16)
    wide = load_model(str(flux_dir), image_size=(16, 32))
    assert small.sample_shape == (4, 8, 8) and wide.sample_shape == (4, 8, 16)
    assert wide.schedule.mu > small.schedule.mu  # more tokens, more shift (FLUX.1-dev's rule)
    assert load_model(str(flux_dir)).sample_shape == (4, 128, 128)  # FluxPipeline's default: 128 × the VAE factor
    with pytest.raises(TmpqError, match="multiples of 4"):
        load_model(str(flux_dir), image_size=18)
    with pytest.raises(TmpqError, match="class-conditional"):
        load_model(str(flux_dir), classes=[1])
    with pytest.raises(TmpqError, match="an image size apply to conditional pipelines only"):
        load_model("builtin:fashion", image_size=16)
    bad = edited_copy(
        flux_dir, flux_dir.parent / "bad", {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    )
    with pytest.raises(TmpqError, match="needs a T5EncoderModel"):
        load_model(str(bad))
    other = edited_copy(flux_dir, flux_dir.parent / "other", {"_class_name": "StableDiffusion3Pipeline"})
    with pytest.raises(TmpqError, match="FLUX pipelines only"):
        load_model(str(other), image_size=16)
    res = runner.invoke(app, ["sample", "--model", str(flux_dir), "--image-size", "16x", "--out", "x.png"])
    assert res.exit_code == 2 and "--image-size takes pixels" in res.output


def test_flux_attention_macs_and_fp_output(flux_dir):
    """The quantized FLUX attention processor at full precision is diffusers' FluxAttnProcessor (to float rounding)
    in both the double- and the single-stream blocks, and every unit's MACs, attention matmuls included, sum to what
    FlopCounterMode counts."""
    names = check_fp_output_and_macs(load_model(str(flux_dir), prompts=["a red shirt"], image_size=16))
    assert any(n.startswith("unet.transformer_blocks.0.attn.processor.qk") for n in names)
    assert any(n.startswith("unet.single_transformer_blocks.0.attn.processor.av") for n in names)


def test_flux_journey_search_export_load_pipeline(flux_dir, tmp_path):
    run = tmp_path / "run"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red shirt\na blue bag\n")
    args = ["run", "--model", str(flux_dir), "--prompts", str(prompts), "--image-size", "16", "--run-dir", str(run)]
    res = runner.invoke(app, [*args, *SEARCH])
    assert res.exit_code == 0, res.output
    # BRECQ (the default) reaches every unit: the attention matmuls inside FluxAttention, both streams judged
    recon = json.loads((run / "supernet" / "supernet.json").read_text())["calibration"]["reconstruction"]
    assert recon["method"] == "brecq" and recon["skipped"] == []
    s = tmpq.load(run / "export")
    assert s.parts.pipeline_class == "FluxPipeline" and s.timesteps[0] == 999 and s.sample_shape == (4, 8, 8)
    assert s.schedule == load_model(str(flux_dir), image_size=16).schedule  # mu and spacing travel with the export
    names = list(s.supernet.units)
    assert any("single_transformer_blocks" in n for n in names) and any("add_q_proj" in n for n in names)
    assert any(n.endswith("attn.processor.qk") for n in names)
    got = s.sample(2, seed=2, prompts=["a red shirt"])
    assert torch.equal(got, tmpq.CompressionResult.open(run).sampler().sample(2, seed=2, prompts=["a red shirt"]))
    assert not torch.equal(s.sample(2, seed=2, prompts=["a blue bag"]), got)
    assert torch.equal(s.lower("packed").sample(2, seed=2, prompts=["a red shirt"]), got)
    pipe = s.to_diffusers()
    assert type(pipe).__name__ == "FluxPipeline"
    g = float(s.supernet.model.guidance_scale)
    mine = (s.sample(1, seed=5, prompts=["a red shirt"]) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(_pipe_images(pipe, "a red shirt", 5, 28, g) - mine).max() < 1e-5


def test_true_cfg_samples_as_flux_pipeline_does_and_travels_with_an_export(flux_dir, tmp_path):
    """FluxPipeline's true CFG (`true_cfg_scale` > 1 with the negative prompt ""): the same images as the pipeline's,
    different from without it; a search's export carries it, and its pipeline, called with the same scale, matches."""
    from diffusers import FluxPipeline

    m = load_model(str(flux_dir), prompts=["a red shirt"], guidance_scale=2.0, image_size=16, true_cfg_scale=3.0)
    assert m.options["true_cfg_scale"] == 3.0 and m.denoiser.true_cfg == 3.0
    pipe = FluxPipeline.from_pretrained(str(flux_dir))
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(3)
    kw = {"num_inference_steps": 4, "height": 16, "width": 16, "guidance_scale": 2.0, "output_type": "np"}
    theirs = pipe("a red shirt", negative_prompt="", true_cfg_scale=3.0, generator=gen, **kw).images
    assert abs(theirs - _mine(m, 4, 3)).max() < 1e-5
    assert abs(_pipe_images(pipe, "a red shirt", 3, 4, 2.0) - _mine(m, 4, 3)).max() > 1e-4  # the second pass counts
    off = load_model(str(flux_dir), prompts=["a red shirt"], image_size=16)
    assert "true_cfg_scale" not in dict(off.denoiser.named_buffers())  # off: the model (and its fingerprint) as before

    run = tmp_path / "run"
    args = ["search", "--model", str(flux_dir), "--image-size", "16", "--true-cfg-scale", "3", "--run-dir", str(run)]
    res = runner.invoke(app, [*args, *SEARCH, "--generations", "1", "--population", "2"])  # the export is under test
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", "--run-dir", str(run), "--out", str(tmp_path / "export")])
    assert res.exit_code == 0, res.output
    s = tmpq.load(tmp_path / "export")
    assert s.supernet.model.true_cfg == 3.0
    mine = (s.sample(1, seed=5, prompts=["a red shirt"]) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    gen = torch.Generator().manual_seed(5)
    kw |= {"num_inference_steps": 28, "guidance_scale": float(s.supernet.model.guidance_scale)}
    theirs = s.to_diffusers()("a red shirt", negative_prompt="", true_cfg_scale=3.0, generator=gen, **kw).images
    assert abs(theirs - mine).max() < 1e-5


def test_true_cfg_is_refused_where_it_does_not_apply(flux_dir, tmp_path):
    with pytest.raises(TmpqError, match="true CFG scale must be >= 1"):
        load_model(str(flux_dir), image_size=16, true_cfg_scale=0.5)
    with pytest.raises(TmpqError, match="apply to conditional pipelines only"):
        load_model("builtin:fashion", true_cfg_scale=2.0)
    other = edited_copy(flux_dir, tmp_path / "other", {"_class_name": "StableDiffusion3Pipeline"})
    with pytest.raises(TmpqError, match="true CFG scale applies to FLUX pipelines only"):
        load_model(str(other), true_cfg_scale=2.0)
    res = runner.invoke(app, ["sample", "--true-cfg-scale", "2", "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "apply to conditional pipelines only" in res.output
