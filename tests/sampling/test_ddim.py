from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from tmpq.errors import TmpqError
from tmpq.models.denoiser import UNetDenoiser
from tmpq.sampling.ddim import DDIMSampler, generate
from tmpq.sampling.schedules import make_timesteps


def _diffusers_ddim(model, x, steps: int, eta: float, clip: bool) -> torch.Tensor:
    sch = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=clip,
        set_alpha_to_one=True,
        steps_offset=0,
    )
    sch.set_timesteps(steps)
    for t in sch.timesteps:
        eps = model(x, t.repeat(x.shape[0]))
        x = sch.step(eps, t, x, eta=eta).prev_sample
    return x, [int(t) for t in sch.timesteps]


@pytest.mark.parametrize("steps", [5, 10, 50])
@pytest.mark.parametrize("clip", [True, False])
def test_matches_diffusers_ddim_on_uniform(tiny_unet, schedule, steps, clip):
    model = UNetDenoiser(tiny_unet)
    x_T = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    ref, ref_ts = _diffusers_ddim(model, x_T.clone(), steps, 0.0, clip)
    ts = make_timesteps("uniform", steps)
    assert ts == ref_ts
    with torch.no_grad():
        ours = DDIMSampler(schedule, ts, clip_sample=clip).sample(model, x_T.clone())
    torch.testing.assert_close(ours, ref.detach(), atol=1e-5, rtol=0)


def test_step_matches_diffusers_with_eta(schedule):
    sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, steps_offset=0)
    sch.set_timesteps(10)
    ts = make_timesteps("uniform", 10)
    ours = DDIMSampler(schedule, ts, eta=0.7, clip_sample=False)
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(3, 1, 8, 8, generator=g) for _ in range(3))
    for i, t in enumerate(ts):
        ref = sch.step(eps, t, x, eta=0.7, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours.step(eps, i, x, noise).prev_sample, ref, atol=1e-5, rtol=0)


def test_any_decreasing_list_runs_and_reaches_clean_range(tiny_unet, schedule):
    model = UNetDenoiser(tiny_unet)
    out = generate(model, DDIMSampler(schedule, [999, 700, 301, 40, 3]), 3, (1, 32, 32), seed=0, progress=False)
    assert out.shape == (3, 1, 32, 32)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_deterministic_under_seed_and_independent_of_batch(tiny_unet, schedule, eta):
    model = UNetDenoiser(tiny_unet)
    sampler = DDIMSampler(schedule, make_timesteps("quad", 4), eta=eta)
    a = generate(model, sampler, 5, (1, 32, 32), seed=7, batch_size=5, progress=False)
    b = generate(model, sampler, 5, (1, 32, 32), seed=7, batch_size=2, progress=False)
    a2 = generate(model, sampler, 5, (1, 32, 32), seed=7, batch_size=5, progress=False)
    c = generate(model, sampler, 5, (1, 32, 32), seed=8, batch_size=5, progress=False)
    assert torch.equal(a, a2)
    # Other batch sizes change only float summation order in the convs.
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert not torch.allclose(a, c)


def test_nan_from_denoiser_is_a_clear_error(schedule):
    sampler = DDIMSampler(schedule, [500, 100])

    def broken(x, t):
        return torch.full_like(x, float("nan"))

    with pytest.raises(TmpqError, match="NaN"):
        sampler.sample(broken, torch.randn(1, 1, 4, 4))


def test_negative_eta_rejected(schedule):
    with pytest.raises(TmpqError, match="eta"):
        DDIMSampler(schedule, [10, 0], eta=-1)


def test_wrong_image_size_is_a_clear_error(tiny_unet):
    with pytest.raises(TmpqError, match="does not match the model"):
        UNetDenoiser(tiny_unet)(torch.randn(1, 1, 28, 28), torch.tensor([5]))
