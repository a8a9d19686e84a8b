"""A class-conditional pixel DiT trained by `tmpq train --arch dit` (the kind `builtin:fashion-dit` is): it loads as a
class-conditional model from its file, FP evaluation cycles its classes like the compressed sampler does, and it goes
through the whole journey search → export → load → backends; diffusers has no pipeline for it, which is said plainly."""

from __future__ import annotations

import pytest
import torch
from class_journey import class_journey
from tiny_pipelines import train_tiny_dit

from tmpq.errors import TmpqError
from tmpq.evaluate import EvalConfig, evaluate, saved_images
from tmpq.metrics.fid import QualityMetric
from tmpq.models.builtin import BUILTIN_DIT_GUIDANCE, BUILTIN_DIT_SCHEDULE
from tmpq.models.loading import load_model
from tmpq.sampling.conditioning import Conditioning
from tmpq.sampling.ddim import DDIMSampler, generate
from tmpq.sampling.schedules import uniform_timesteps

SEARCH = ["--like", "W8A8", "--budget-steps", "3", "--steps", "3", "--generations", "2", "--population", "4"]
SEARCH += ["--calib-samples", "2", "--calib-steps", "3", "--w-bits", "4,8", "--a-bits", "8", "--fitness-samples", "4"]
SEARCH += ["--fitness", "proxy", "--proxy-space", "pixels", "--final-samples", "0", "--device", "cpu"]
SEARCH += ["--lever", "joint", "--reconstruction", "none"]


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    return train_tiny_dit(tmp_path_factory.mktemp("dit") / "run")


def test_a_trained_dit_loads_class_conditional(dit_file):
    m = load_model(str(dit_file))
    assert m.kind == "class2image" and m.class_labels == tuple(range(10)) and m.decoder is None
    assert m.sample_shape == (1, 32, 32) and m.options == {"guidance_scale": BUILTIN_DIT_GUIDANCE}
    m = load_model(str(dit_file), classes=[3, 1], guidance_scale=1.5)
    assert m.conditioning(3).embeddings().tolist() == [3, 1, 3] and float(m.denoiser.guidance_scale) == 1.5
    assert m.options == {"guidance_scale": 1.5, "classes": [3, 1]}
    with pytest.raises(TmpqError, match=r"label ids in \[0, 10\)"):
        load_model(str(dit_file), classes=[10])
    with pytest.raises(TmpqError, match="conditional pipelines only"):
        load_model(str(dit_file), prompts=["a shirt"])
    with pytest.raises(TmpqError, match="class-conditional models only"):
        load_model("builtin:fashion", classes=[1])
    with pytest.raises(TmpqError, match="the built-in models are 'builtin:fashion', 'builtin:fashion-dit'"):
        load_model("builtin:dit")


def test_a_trained_dit_samples_without_clipping_x0(dit_file):
    """A `tmpq train --arch dit` file declares DDIM without x̂0 clipping (BUILTIN_DIT_SCHEDULE: clipping made the
    built-in DiT's FID rise with steps), so its sampler's last step returns an unclipped x̂0; the UNet keeps it."""
    m = load_model(str(dit_file))
    assert m.schedule == BUILTIN_DIT_SCHEDULE and m.schedule.clip_sample is False
    ddim = DDIMSampler(m.schedule, [0])
    x = torch.full((1, 1, 32, 32), 3.0)
    assert torch.allclose(ddim.step(torch.zeros_like(x), 0, x).prev_sample, x / m.schedule.alphas_cumprod[0].sqrt())
    unet = DDIMSampler(load_model("builtin:fashion").schedule, [0])
    assert unet.step(torch.zeros_like(x), 0, x).prev_sample.max() == 1


def test_fp_evaluation_cycles_the_classes_from_sample_zero(dit_file, tmp_path):
    """`evaluate` on the FP model conditions sample i on class i mod P (as a compressed sampler's evaluation does),
    whatever its batch size."""
    m = load_model(str(dit_file), classes=[2, 7])
    ref = torch.rand(20, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    metric = QualityMetric(reference=lambda: ref, reference_key="test-random")
    cfg = EvalConfig(model=str(dit_file), steps=3, schedule="uniform", num_samples=5, batch_size=2)
    evaluate(cfg, tmp_path / "ev", loaded=m, metric=metric, progress=False, save_images=True)
    ddim = DDIMSampler(m.schedule, uniform_timesteps(3))
    with torch.no_grad():
        want = generate(m.denoiser, ddim, 5, m.sample_shape, 0, 5, progress=False, cond=m.conditioning(5))
        swapped = generate(
            m.denoiser, ddim, 5, m.sample_shape, 0, 5, progress=False, cond=Conditioning.cycle(torch.tensor([7, 2]), 5)
        )
    got = saved_images(tmp_path / "ev")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - swapped).abs().max() > 1e-3  # the labels reach the model


def test_trained_dit_journey_search_export_load_backends(dit_file, tmp_path):
    s = class_journey(str(dit_file), tmp_path / "run", SEARCH, BUILTIN_DIT_GUIDANCE, (1, 32, 32))
    assert s.parts.decoder is None
    with pytest.raises(TmpqError, match="no diffusers pipeline: DiTPipeline decodes latents with a VAE"):
        s.to_diffusers()
