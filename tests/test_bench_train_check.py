"""bench/train_check.py's ε̂-by-timestep check: on a class-conditional DiT it predicts unguided on each held-out
image's own label (what the training targets), not with the sampler's guidance or cycled classes."""

from __future__ import annotations

import pytest
import torch
from bench_scripts import load_bench_script
from tiny_pipelines import train_tiny_dit

from tmpq.data import load_fashion_mnist
from tmpq.models.loading import load_model


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    return train_tiny_dit(tmp_path_factory.mktemp("dit") / "run")


def _mse(loaded, x0, labels, t: int) -> float:
    """The ε̂ MSE at t with the given labels, by the network's own call (the check's noise: seed t)."""
    a = loaded.schedule.alphas_cumprod
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
    xt = a[t].sqrt() * x0 + (1 - a[t]).sqrt() * noise
    den = loaded.denoiser
    with torch.no_grad():
        out = den.unet(xt, timestep=den.network_timestep(torch.full((len(xt),), t)), class_labels=labels).sample
    return float((out[:, :1] - noise).pow(2).mean())


def test_eps_by_t_of_a_dit_uses_each_images_own_label_unguided(dit_file):
    check = load_bench_script("train_check")
    got = check.eps_error_by_t(str(dit_file), n=8)
    assert set(got) == set(check.EPS_TIMESTEPS)
    x0, labels = load_fashion_mnist("test", limit=8)
    loaded = load_model(str(dit_file))
    own = _mse(loaded, x0, labels.long(), 50)
    null = _mse(loaded, x0, torch.full((8,), loaded.denoiser.num_classes), 50)
    assert got[50][0] == pytest.approx(own, rel=1e-5)
    assert abs(own - null) > 1e-3 * own  # the labels matter to this network, so the check above can fail
