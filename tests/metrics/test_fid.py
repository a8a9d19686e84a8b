"""FID/IS behaviour with the shipped classifier (a test about the shipped file)."""

from __future__ import annotations

import pytest
import torch

from tmpq.data import load_fashion_mnist
from tmpq.errors import TmpqError
from tmpq.metrics.classifier import accuracy, classifier_info, load_classifier
from tmpq.metrics.fid import QualityMetric


@pytest.fixture(scope="module")
def test_split():
    return load_fashion_mnist("test")


def test_shipped_classifier_is_accurate_on_held_out_data(test_split):
    x, y = test_split
    acc = accuracy(load_classifier(), x[:3000], y[:3000])
    assert acc >= 0.91
    assert classifier_info()["test_accuracy"] >= 0.91


def _metric(real: torch.Tensor, tmp_path) -> QualityMetric:
    return QualityMetric(reference=lambda: real, reference_key="test-half-a", cache_dir=tmp_path)


def test_fid_small_for_real_halves_large_for_noise_and_mode_dropping(test_split, tmp_path):
    x, y = test_split
    metric = _metric(x[:5000], tmp_path)
    fid_real = metric.fid(x[5000:])
    noise = torch.rand(5000, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fid_noise = metric.fid(noise)
    # Measured: 2.67 for the halves, ~1,200 for uniform noise, ~650 when half the classes are missing.
    assert fid_real < 5.0
    assert fid_noise > 100 * fid_real
    assert metric.fid(x[5000:][y[5000:] < 5]) > 50 * fid_real


def test_reference_stats_are_cached_and_reused(test_split, tmp_path):
    x, _ = test_split
    calls = []

    def reference():
        calls.append(1)
        return x[:1000]

    a = QualityMetric(reference=reference, reference_key="k", cache_dir=tmp_path).fid(x[1000:1500])
    b = QualityMetric(reference=reference, reference_key="k", cache_dir=tmp_path).fid(x[1000:1500])
    assert a == pytest.approx(b, rel=1e-9) and len(calls) == 1
    assert len(list(tmp_path.glob("fid_ref_*.safetensors"))) == 1


def test_inception_score_high_for_real_low_for_one_class(test_split, tmp_path):
    x, y = test_split
    metric = _metric(x[:1000], tmp_path)
    is_real, _ = metric.inception_score(x[:2000])
    is_one, _ = metric.inception_score(x[y == 1][:500])
    assert is_real > 7.0  # ten balanced, confidently classified classes: close to 10
    assert is_one < 1.5
    assert metric.inception_score(x[:2000], seed=3) == metric.inception_score(x[:2000], seed=3)


def test_nan_images_and_bad_feature_space(test_split, tmp_path):
    x, _ = test_split
    metric = _metric(x[:500], tmp_path)
    with pytest.raises(TmpqError, match="NaN"):
        metric.fid(torch.full((4, 1, 32, 32), float("nan")))
    with pytest.raises(TmpqError, match="unknown feature space"):
        QualityMetric(reference=lambda: x, reference_key="k", feature_space="clip", cache_dir=tmp_path)
    with pytest.raises(TmpqError, match="weights file"):
        QualityMetric(reference=lambda: x, reference_key="k", feature_space="inception", cache_dir=tmp_path)
    with pytest.raises(TmpqError, match="32, 32"):
        metric.fid(torch.zeros(4, 1, 28, 28))


def test_fid_between_two_sets_is_the_fid_with_the_second_as_reference(test_split, tmp_path):
    x, y = test_split
    metric = _metric(x[:1000], tmp_path)  # the real-data reference plays no part
    a, b = x[1000:2000], x[2000:3000]
    assert metric.fid_between(a, a) < 1e-3
    assert metric.fid_between(a, b) == pytest.approx(
        QualityMetric(reference=lambda: b, reference_key="b", cache_dir=tmp_path).fid(a), rel=1e-6
    )
    assert metric.fid_between(a[y[1000:2000] < 5], b) > 20 * metric.fid_between(a, b)
    with pytest.raises(TmpqError, match="at least 2"):
        metric.fid_between(a[:1], b)
    # one set compared with many: its statistics extracted once give the same FID as its images
    stats_b = metric.stats(b)
    for other in (a, x[3000:3500]):
        assert metric.fid_between(other, reference_stats=stats_b) == pytest.approx(metric.fid_between(other, b))
    with pytest.raises(TmpqError, match="one of them"):
        metric.fid_between(a, b, reference_stats=stats_b)
    with pytest.raises(TmpqError, match="one of them"):
        metric.fid_between(a)


def test_kid_equals_torchmetrics_on_full_sets_and_separates_real_from_damaged(test_split, tmp_path):
    from torchmetrics.image.kid import KernelInceptionDistance

    from tmpq.metrics.classifier import load_classifier
    from tmpq.metrics.fid import _Features

    x, y = test_split
    real, fake = x[:600], x[600:1200]
    metric = _metric(real, tmp_path)  # 600 reference images: fewer than KID_REFERENCE_SIZE, so all of them
    ours = metric.kid(fake)
    # torchmetrics on the same two sets, its one random subset being each whole set: the same unbiased estimate
    tm = KernelInceptionDistance(feature=_Features(load_classifier()), subsets=1, subset_size=600)
    tm.update(real.clamp(-1, 1), real=True)
    tm.update(fake.clamp(-1, 1), real=False)
    assert ours == pytest.approx(float(tm.compute()[0]), rel=1e-4, abs=1e-3)
    # unbiased: another real half scores near zero (either sign), damage scores far above it
    noise = torch.rand(600, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    half_classes = x[1200:2400][y[1200:2400] < 5][:600]
    assert abs(ours) < 0.02 * metric.kid(half_classes)
    assert metric.kid(half_classes) < metric.kid(noise)
    assert metric.kid(fake[:128]) == metric.kid(fake[:128])  # no random subsets: deterministic


def test_kid_reference_is_a_fixed_cached_subset(test_split, tmp_path, monkeypatch):
    import tmpq.metrics.fid as fid_mod

    x, _ = test_split
    calls = []

    def reference():
        calls.append(1)
        return x[:1000]

    monkeypatch.setattr(fid_mod, "KID_REFERENCE_SIZE", 400)
    a = QualityMetric(reference=reference, reference_key="k", cache_dir=tmp_path)
    first = a.kid(x[1000:1200])
    assert a.kid_reference()["features"].shape[0] == 400
    b = QualityMetric(reference=reference, reference_key="k", cache_dir=tmp_path)
    assert b.kid(x[1000:1200]) == pytest.approx(first, rel=1e-12) and len(calls) == 1
    assert len(list(tmp_path.glob("kid_ref_*.safetensors"))) == 1
    with pytest.raises(TmpqError, match="at least 2"):
        a.kid(x[:1])
