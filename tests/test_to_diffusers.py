"""A compressed sampler handed back as a diffusers pipeline: `pipe()` / `pipe(prompt)` run the quantized UNet,
switched per timestep, on the searched timesteps, and give what `CompressedSampler.sample` gives."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from tiny_pipelines import save_latent_pipeline, save_text2image_pipeline

import tmpq
from tmpq.compressed import CompressedSampler
from tmpq.models.loading import load_model
from tmpq.quant import CalibConfig, QuantSpec
from tmpq.quant.prepare import prepare_supernet
from tmpq.sampling.ddim import per_sample_noise, seed_generators
from tmpq.sampling.scheduler import SearchedDDIMScheduler

TIMESTEPS = [900, 640, 420, 130, 10]


def _sampler(spec: str, run_dir, **load_kw) -> CompressedSampler:
    """Two bit phases (W8A8 above t = 500, W4A8 below), so the pipeline must switch bits mid-sampling."""
    loaded = load_model(spec, **load_kw)
    sn, _, _ = prepare_supernet(
        loaded, run_dir, CalibConfig(2, 3), QuantSpec(w_bits=(4, 8), a_bits=(8,), reconstruction=None), False
    )
    phases = [sn.uniform_config(8, 8), sn.uniform_config(4, 8)]
    return CompressedSampler(sn, loaded.schedule, TIMESTEPS, phases, (500,), loaded.sample_shape, parts=loaded.parts)


def _np(images: torch.Tensor):
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_pixel_pipeline(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    )  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "p")
    s = _sampler(str(tmp_path / "p"), tmp_path / "run")
    pipe = s.to_diffusers()
    assert type(pipe).__name__ == "DDPMPipeline" and isinstance(pipe.scheduler, SearchedDDIMScheduler)
    out = pipe(batch_size=1, generator=torch.Generator().manual_seed(5), output_type="np").images
    assert out.shape == (1, 8, 8, 3) and abs(out - _np(s.sample(1, seed=5))).max() < 1e-5
    assert pipe.scheduler.timesteps.tolist() == TIMESTEPS  # whatever num_inference_steps the pipeline asked for


def test_latent_pipeline_decodes_like_the_sampler(tmp_path):
    s = _sampler(str(save_latent_pipeline(tmp_path / "ldm")), tmp_path / "run")
    pipe = s.to_diffusers()
    assert type(pipe).__name__ == "LDMPipeline" and pipe.vqvae is s.parts.decoder.vae
    out = pipe(batch_size=1, generator=torch.Generator().manual_seed(5), output_type="np").images
    assert out.shape == (1, 16, 16, 3) and abs(out - _np(s.sample(1, seed=5))).max() < 1e-5


def test_text2image_pipeline_uses_the_prompt_and_the_searched_bits(tmp_path):
    s = _sampler(str(save_text2image_pipeline(tmp_path / "sd")), tmp_path / "run", guidance_scale=3.0)
    exported = tmpq.load(s.export(tmp_path / "exp"))
    x_T = per_sample_noise(seed_generators([5]), s.sample_shape)
    results = {}
    for name, sampler in (("memory", s), ("exported", exported)):
        pipe = sampler.to_diffusers()
        assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.safety_checker is None

        def run(prompt, pipe=pipe):
            return pipe(prompt, latents=x_T, guidance_scale=3.0, output_type="latent", height=16, width=16).images

        results[name] = run("a red car")
        ref = sampler.sample(1, seed=5, prompts=["a red car"], decode=False)
        assert torch.allclose(results[name], ref, atol=1e-5)
        assert (run("a blue sky") - results[name]).abs().mean() > 1e-3  # the prompt matters
        images = pipe("a red car", num_inference_steps=50, guidance_scale=3.0, height=16, width=16).images
        assert len(images) == 1 and images[0].size == (16, 16)  # PIL, as with the original pipeline
    assert torch.equal(results["memory"], results["exported"])
    pipe = s.to_diffusers()  # the bits matter: without the switching hook the UNet stays at full precision
    pipe.unet._tmpq_switch.remove()
    s.supernet.set_fp()
    fp_out = pipe("a red car", latents=x_T, guidance_scale=3.0, output_type="latent", height=16, width=16).images
    assert not torch.allclose(fp_out, results["memory"], atol=1e-4)


def test_pipeline_refuses_a_timestep_it_was_not_compressed_for(tmp_path):
    s = _sampler(str(save_latent_pipeline(tmp_path / "ldm")), tmp_path / "run")
    pipe = s.to_diffusers()
    with pytest.raises(tmpq.TmpqError, match="not one of this compressed model's steps"):
        pipe.unet(torch.randn(1, 4, 8, 8), 500)
