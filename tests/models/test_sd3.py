"""Stable Diffusion 3 pipelines end to end on a tiny random StableDiffusion3Pipeline saved with `save_pretrained`
(SD3Transformer2DModel, two CLIP encoders with projection, T5, flow matching): loading, the pipeline's own prompt
encoding and guidance, and search → export → load → backends → StableDiffusion3Pipeline."""

from __future__ import annotations

import pytest
import torch
from attention_checks import check_fp_output_and_macs
from tiny_pipelines import edited_copy, save_sd3_pipeline
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
def sd3_dir(tmp_path_factory):
    return save_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


def _pipe_images(pipe, prompt: str, seed: int, steps: int, g: float):
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, height=16, width=16, guidance_scale=g, output_type="np",
                generator=gen).images  # fmt: skip


def _mine(m, steps: int, seed: int):
    ts = m.schedule.timesteps("uniform", steps)
    x = generate(m.denoiser, DDIMSampler(m.schedule, ts), 1, m.sample_shape, seed=seed, cond=m.conditioning(1))
    return (m.decode(x) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_an_sd3_pipeline_samples_as_diffusers_does(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    m = load_model(str(sd3_dir), prompts=["a red shirt"], guidance_scale=3.0)
    assert m.kind == "text2image" and m.pipeline_class == "StableDiffusion3Pipeline"
    assert isinstance(m.schedule, FlowSchedule) and m.schedule.shift == 3.0 and m.sample_shape == (4, 8, 8)
    assert m.prompt_table().shape == (1, 16 + 256 + 1, 32)  # CLIP tokens, T5 tokens, the pooled projection
    mine = _mine(m, 4, 3)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    pipe.set_progress_bar_config(disable=True)
    assert abs(_pipe_images(pipe, "a red shirt", 3, 4, 3.0) - mine).max() < 1e-5
    assert m.options["guidance_scale"] == 3.0 and load_model(str(sd3_dir)).options["guidance_scale"] == 7.0
    with pytest.raises(TmpqError, match="needs a CLIPTextModelWithProjection"):
        load_model(
            str(edited_copy(sd3_dir, sd3_dir.parent / "bad", {"text_encoder": ["transformers", "CLIPTextModel"]}))
        )


def test_joint_attention_macs_and_fp_output(sd3_dir):
    """The quantized joint-attention processor at full precision is diffusers' JointAttnProcessor2_0 (to float
    rounding), and every unit's MACs, matmuls included, sum to what FlopCounterMode counts."""
    names = check_fp_output_and_macs(load_model(str(sd3_dir), prompts=["a red shirt"]))
    assert any(n.endswith("attn.processor.qk") for n in names)


def test_sd35_dual_attention_and_qk_norm(tmp_path):
    """Stable Diffusion 3.5 medium's transformer features (a second, image-only attention in the first blocks; RMS
    QK-norm): samples equal the pipeline's, and the second attention gets its own quantized matmuls."""
    from diffusers import StableDiffusion3Pipeline

    d = save_sd3_pipeline(tmp_path / "sd35", sd35=True)
    m = load_model(str(d), prompts=["a red shirt"], guidance_scale=3.0)
    assert m.denoiser.unet.config.dual_attention_layers == [0] and m.denoiser.unet.config.qk_norm == "rms_norm"
    mine = _mine(m, 4, 3)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(d))
    pipe.set_progress_bar_config(disable=True)
    assert abs(_pipe_images(pipe, "a red shirt", 3, 4, 3.0) - mine).max() < 1e-5
    names = check_fp_output_and_macs(m)
    assert "unet.transformer_blocks.0.attn2.processor.qk" in names and "unet.transformer_blocks.0.attn2.to_q" in names


def test_sd3_journey_search_export_load_pipeline(sd3_dir, tmp_path):
    run = tmp_path / "run"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red shirt\na blue bag\n")
    res = runner.invoke(
        app, ["run", "--model", str(sd3_dir), "--prompts", str(prompts), "--run-dir", str(run), *SEARCH]
    )
    assert res.exit_code == 0, res.output
    s = tmpq.load(run / "export")
    assert s.parts.pipeline_class == "StableDiffusion3Pipeline" and s.timesteps[0] == 999
    names = list(s.supernet.units)
    assert any("add_q_proj" in n for n in names) and any(n.endswith("attn.processor.qk") for n in names)
    got = s.sample(2, seed=2, prompts=["a red shirt"])
    assert torch.equal(got, tmpq.CompressionResult.open(run).sampler().sample(2, seed=2, prompts=["a red shirt"]))
    assert not torch.equal(s.sample(2, seed=2, prompts=["a blue bag"]), got)
    assert torch.equal(s.lower("packed").sample(2, seed=2, prompts=["a red shirt"]), got)
    pipe = s.to_diffusers()
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    g = float(s.supernet.model.guidance_scale)
    mine = (s.sample(1, seed=5, prompts=["a red shirt"]) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(_pipe_images(pipe, "a red shirt", 5, 28, g) - mine).max() < 1e-5
