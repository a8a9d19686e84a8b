from __future__ import annotations

import pytest
import torch

from tmpq.errors import TmpqError
from tmpq.quant import CalibConfig, CalibrationSet, collect_calibration
from tmpq.sampling.schedules import NoiseSchedule, uniform_timesteps


def test_collects_every_step_of_every_trajectory(calib):
    assert calib.x.shape == (6 * 4, 1, 32, 32)
    counts = {int(t): int((calib.t == t).sum()) for t in calib.t.unique()}
    assert sorted(counts) == sorted(uniform_timesteps(4))  # spread over the whole trajectory
    assert set(counts.values()) == {6}


def test_deterministic_under_seed(make_denoiser, calib):
    again = collect_calibration(
        make_denoiser(), NoiseSchedule(), (1, 32, 32), CalibConfig(num_samples=6, num_steps=4), progress=False
    )
    assert torch.equal(again.x, calib.x) and torch.equal(again.t, calib.t)


def test_save_load_round_trip(calib, tmp_path):
    path = tmp_path / "calib.safetensors"
    calib.save(path)
    back = CalibrationSet.load(path)
    assert torch.equal(back.x, calib.x) and torch.equal(back.t, calib.t) and back.config == calib.config


def test_load_errors(calib, tmp_path):
    with pytest.raises(TmpqError, match="not found"):
        CalibrationSet.load(tmp_path / "missing.safetensors")
    path = tmp_path / "calib.safetensors"
    calib.save(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TmpqError, match="unreadable"):
        CalibrationSet.load(path)
    with pytest.raises(TmpqError):
        CalibConfig(num_samples=0)


def test_open_reads_rows_from_the_file_on_demand(calib, tmp_path):
    """A reopened set streams x_t from disk: the same rows by slice, index or mask, and the same batches."""
    from tmpq.quant.calibration import FileRows

    calib.save(tmp_path / "c.safetensors")
    lazy = CalibrationSet.open(tmp_path / "c.safetensors")
    assert isinstance(lazy.x, FileRows) and len(lazy) == len(calib) and lazy.x.shape == tuple(calib.x.shape)
    idx = torch.tensor([5, 0, 17])
    assert torch.equal(lazy.x[idx], calib.x[idx]) and torch.equal(lazy.x[2:9], calib.x[2:9])
    assert torch.equal(lazy.x[calib.t == calib.t[3]], calib.x[calib.t == calib.t[3]])
    for (a, ta, _), (b, tb, _) in zip(lazy.batches(5), calib.batches(5), strict=True):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    with pytest.raises(TmpqError, match="saved already"):
        lazy.save(tmp_path / "again.safetensors")
