"""bench/peers.py: the pieces that decide what a row means (which rows, which cached rows count, error bars)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bench_scripts import load_bench_script

from tmpq.evaluate import EvalConfig


@pytest.fixture(scope="module")
def peers():
    return load_bench_script("peers")


def test_single_lever_rows_differ_from_joint_only_in_the_lever(peers) -> None:
    rows = {r.name: r for r in peers.rows_spec("fid", 128, 10, 128, 2, "W4A6", 0, "uniform")}
    assert len(rows) == 12
    joint = rows["joint_tmpq_w6a6_uniform"].search
    assert (joint.fitness.kind, joint.fitness.num_samples) == ("fid", 128)  # the fitness it was given
    for name, lever in (("bits_w6a6_uniform", "bits"), ("timesteps_w6a6_uniform", "timesteps")):
        other = rows[name].search
        assert other.lever == lever
        assert {k: v for k, v in other.to_dict().items() if k != "lever"} == {
            k: v for k, v in joint.to_dict().items() if k != "lever"
        }
    ref = rows["joint_ref_w6a6"].search
    assert (ref.grouping, ref.fitness.kind, ref.evolution.repair, ref.evolution.population) == (
        "quad",
        "fid",
        False,
        50,
    )
    assert ref.budget == joint.budget
    assert rows["joint_tmpq_w4a6_uniform"].search.budget.w == 4
    quad = [r.name for r in peers.rows_spec("fid", 128, 10, 128, 2, "W4A6", 0, "quad")]
    assert len(quad) == len(set(quad)) == 11  # the quad-schedule W6A6 PTQ row is not listed twice


def test_score_gives_the_fid_of_two_disjoint_halves(peers) -> None:
    class Metric:
        def score(self, images, seed=0):
            return type("S", (), {"fid": float(images.mean()), "inception_score": 1.0, "inception_score_std": 0.0})

        def fid(self, images):
            return float(images.mean())

    images = torch.cat([torch.zeros(5, 1, 2, 2), torch.ones(5, 1, 2, 2)])
    s = peers.score(images, Metric(), 0)
    assert s["fid_halves"] == [0.0, 1.0] and s["fid_half_spread"] == 1.0 and s["fid"] == 0.5


def test_fp_rows_are_reused_only_for_the_same_config_and_weights(peers, tmp_path: Path) -> None:
    row = peers.Row("fp10_quad", "FP, 10 steps (quad)", "fp", 10, "quad")
    cfg = json.loads(json.dumps(EvalConfig(steps=10, schedule="quad", num_samples=50, seed=0).__dict__))
    cfg.pop("backend")  # a row written before a field existed still counts (defaults filled in)
    saved = {"config": cfg, "fid": 12.5, "inception_score": 3.0, "provenance": {"inputs_sha256": {"model": "abc"}}}
    (tmp_path / "quad_10_50_0.json").write_text(json.dumps(saved))
    assert peers.reused_fp_row(tmp_path, row, 50, 0, "abc")["fid"] == 12.5
    assert peers.reused_fp_row(tmp_path, row, 50, 0, "other weights") is None
    assert peers.reused_fp_row(tmp_path, row, 60, 0, "abc") is None  # another sample count: another file
    by_path = saved | {"config": cfg | {"model": "/somewhere/fashion_unet.safetensors"}}
    (tmp_path / "quad_10_50_0.json").write_text(json.dumps(by_path))
    assert peers.reused_fp_row(tmp_path, row, 50, 0, "abc")["fid"] == 12.5  # same weights under another name
    assert peers.reused_fp_row(tmp_path, row, 50, 0, None) is None  # no weights file: the spec must match


def test_search_directories_share_the_prepared_files(peers, tmp_path: Path) -> None:
    shared, a, b = tmp_path / "shared", tmp_path / "a", tmp_path / "b"
    (shared / "supernet").mkdir(parents=True)
    (shared / "supernet" / "supernet.json").write_text("{}")
    (shared / "calib.safetensors").write_bytes(b"x")
    peers.seed_run_dir(shared, a)
    assert (a / "supernet" / "supernet.json").is_file() and (a / "calib.safetensors").is_file()
    (a / "sensitivity.json").write_text('{"key": 1}')
    peers.keep_shared(shared, a)
    peers.seed_run_dir(shared, b)
    assert (b / "sensitivity.json").read_text() == '{"key": 1}'
