"""Measured speed of an exported sampler: the gain splits exactly into steps × kernels × BitOPs-only."""

from __future__ import annotations

import json
import random

import pytest

from tmpq.compressed import CompressedSampler
from tmpq.quant import build_supernet
from tmpq.runtime.measure import measure_speed, speed_lines
from tmpq.sampling.schedules import NoiseSchedule
from tmpq.search import SearchSpace


@pytest.fixture(scope="module")
def export_dir(make_denoiser, calib, small_spec, tmp_path_factory):
    sn = build_supernet(make_denoiser(), calib, small_spec, progress=False)
    space = SearchSpace.from_supernet(sn, steps=(4,))
    s = CompressedSampler.from_candidate(sn, space, space.random(random.Random(1)), NoiseSchedule(), (1, 32, 32))
    return s.export(tmp_path_factory.mktemp("exp") / "exp")


def test_measure_speed_splits_the_gain(export_dir, tmp_path):
    res = measure_speed(export_dir, tmp_path / "speed.json", batches=(1, 4), full_steps=20)
    assert json.loads((tmp_path / "speed.json").read_text()) == json.loads(json.dumps(res))
    g = res["gain"]
    assert g["from_steps"] == pytest.approx(20 / 4)
    assert g["real"] == pytest.approx(g["from_steps"] * g["from_kernels"])
    assert g["bitops"] == pytest.approx(g["real"] * g["bitops_only"])
    assert g["bitops"] > g["from_steps"]  # quantization saves BitOPs beyond the step reduction
    assert all(v > 0 for d in res["ms_per_image_step"].values() for v in d.values())
    assert 0 < res["int8_mac_share"] <= 1 and res["resident_bytes"]["int8"] < res["resident_bytes"]["fp32"]
    text = "\n".join(speed_lines(res))
    assert "FP32, 20 steps" in text and "int8 backend" in text and "real speed here" in text
