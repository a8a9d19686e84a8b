"""`evaluate`: batches kept as they finish, so a killed evaluation resumes to the very tensor an uninterrupted run
makes; the FID halves (the error bar) come with every result."""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest
import torch

from tmpq.errors import TmpqError
from tmpq.evaluate import PARTIAL, EvalConfig, evaluate, saved_images
from tmpq.metrics.fid import QualityMetric
from tmpq.models.denoiser import UNetDenoiser
from tmpq.models.loading import LoadedModel
from tmpq.sampling.schedules import NoiseSchedule

ev = importlib.import_module("tmpq.evaluate")  # the module (tmpq.evaluate the name is also the function)


class Killed(Exception):
    pass


@pytest.fixture
def loaded(tiny_unet):
    den = UNetDenoiser(tiny_unet, NoiseSchedule()).eval()
    return LoadedModel(den, den.schedule, den.sample_shape, "tiny", None)


@pytest.fixture
def metric():
    ref = torch.rand(40, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return QualityMetric(reference=lambda: ref, reference_key="test-random")


def _dies_on_batch(n: int, real_generate):
    """`generate` that samples batches as usual and raises Killed when asked for the n-th one (a kill mid-run)."""
    calls = []

    def generate(*args, **kwargs):
        calls.append(args[4])  # the batch's first seed
        if len(calls) == n:
            raise Killed
        return real_generate(*args, **kwargs)

    return generate


def test_a_killed_evaluation_resumes_to_the_uninterrupted_result(loaded, metric, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPQ_CACHE", str(tmp_path / "cache"))
    cfg = EvalConfig(model="tiny", steps=2, schedule="uniform", num_samples=10, batch_size=4)
    whole = evaluate(cfg, tmp_path / "whole", loaded=loaded, metric=metric, progress=False)
    assert not (tmp_path / "whole" / PARTIAL).exists() and whole.fid_halves is not None
    assert all(h > 0 for h in whole.fid_halves)

    real_generate = ev.generate
    monkeypatch.setattr(ev, "generate", _dies_on_batch(3, real_generate))
    with pytest.raises(Killed):
        evaluate(cfg, tmp_path / "run", loaded=loaded, metric=metric, progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / PARTIAL).glob("*.safetensors")) == [
        "00000000.safetensors",
        "00000004.safetensors",
    ]
    spy = []
    monkeypatch.setattr(ev, "generate", lambda *a, **k: spy.append(a[4]) or real_generate(*a, **k))
    again = evaluate(cfg, tmp_path / "run", loaded=loaded, metric=metric, progress=False)
    assert spy == [8]  # only the missing batch was sampled
    assert (again.fid, again.fid_halves, again.inception_score) == (whole.fid, whole.fid_halves, whole.inception_score)
    assert not (tmp_path / "run" / PARTIAL).exists()


def test_stale_batches_are_dropped_and_a_foreign_folder_is_refused(loaded, metric, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPQ_CACHE", str(tmp_path / "cache"))
    cfg = EvalConfig(model="tiny", steps=2, schedule="uniform", num_samples=6, batch_size=3)
    other = EvalConfig(model="tiny", steps=3, schedule="uniform", num_samples=6, batch_size=3)
    monkeypatch.setattr(ev, "generate", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):  # leaves our stamp for the other config, no batch
        evaluate(other, tmp_path / "run", loaded=loaded, metric=metric, progress=False)
    monkeypatch.undo()
    monkeypatch.setenv("TMPQ_CACHE", str(tmp_path / "cache"))
    stale = tmp_path / "run" / PARTIAL
    torch.save(torch.zeros(1), stale / "00000000.safetensors")  # not even a safetensors file: must not be read
    res = evaluate(cfg, tmp_path / "run", loaded=loaded, metric=metric, progress=False)
    ref = evaluate(cfg, None, loaded=loaded, metric=metric, progress=False)
    assert res.fid == ref.fid and not stale.exists()

    theirs = tmp_path / "mine" / PARTIAL
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("a user's file")
    with pytest.raises(TmpqError, match="not written by"):
        evaluate(cfg, tmp_path / "mine", loaded=loaded, metric=metric, progress=False)
    assert (theirs / "notes.txt").read_text() == "a user's file"


def test_batches_of_other_weights_at_the_same_path_are_not_reused(tiny_unet, metric, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPQ_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"first weights")
    den = UNetDenoiser(tiny_unet, NoiseSchedule()).eval()
    loaded = LoadedModel(den, den.schedule, den.sample_shape, str(weights), weights)
    cfg = EvalConfig(model=str(weights), steps=2, schedule="uniform", num_samples=6, batch_size=3)
    real_generate = ev.generate
    monkeypatch.setattr(ev, "generate", _dies_on_batch(2, real_generate))
    with pytest.raises(Killed):
        evaluate(cfg, tmp_path / "run", loaded=loaded, metric=metric, progress=False)
    weights.write_bytes(b"retrained weights")  # same path, other file: its batches are another model's
    spy = []
    monkeypatch.setattr(ev, "generate", lambda *a, **k: spy.append(a[4]) or real_generate(*a, **k))
    evaluate(cfg, tmp_path / "run", loaded=loaded, metric=metric, progress=False)
    assert spy == [0, 3]


def test_fidelity_to_another_sampler_on_the_same_seeds(loaded, metric, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPQ_CACHE", str(tmp_path / "cache"))
    cfg = EvalConfig(model="tiny", steps=2, schedule="uniform", num_samples=10, batch_size=5)
    fp = evaluate(cfg, tmp_path / "fp", loaded=loaded, metric=metric, progress=False, save_images=True)
    assert fp.fidelity is None
    images = saved_images(tmp_path / "fp")
    assert images.shape == (10, 1, 32, 32)
    same = evaluate(cfg, None, loaded=loaded, metric=metric, progress=False, compare_to=images)
    assert same.fidelity["fid"] < 1e-3 and same.fidelity["psnr_db"] > 100  # the same images
    other = replace(cfg, steps=3)  # another sampler on the same seeds
    moved = evaluate(other, None, loaded=loaded, metric=metric, progress=False, compare_to=images).fidelity
    assert moved["fid"] > 1.0 and 0 < moved["psnr_db"] < 60
    with pytest.raises(TmpqError, match="same seeds and sample count"):
        evaluate(replace(cfg, num_samples=4), None, loaded=loaded, metric=metric, compare_to=images)
    with pytest.raises(TmpqError, match="give an output directory"):
        evaluate(cfg, None, loaded=loaded, metric=metric, save_images=True)
    with pytest.raises(TmpqError, match="save_images=True"):
        saved_images(tmp_path / "nothing")
