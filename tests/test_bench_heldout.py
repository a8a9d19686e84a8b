"""bench/assets/heldout_pipeline: the held-out diffusers pipeline the defaults are measured on is shipped, is what
its training script builds, and loads through tmpq as a v-prediction model on the cosine schedule."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from bench_scripts import load_bench_script

from tmpq.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "bench" / "assets" / "heldout_pipeline"


def test_shipped_pipeline_is_what_the_training_script_builds_and_records_its_recipe():
    shipped = json.loads((ASSET / "unet" / "config.json").read_text())
    built = load_bench_script("train_heldout_pipeline").build_unet().config
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "sample_size"):
        assert json.loads(json.dumps(built[key])) == shipped[key], key  # tuples as the saved config lists them
    training = json.loads((ASSET / "training.json").read_text())
    assert training["steps"] == 4000 and training["batch_size"] == 64 and training["wall_s"] > 0
    assert "train_heldout_pipeline.py" in (ASSET / "README.md").read_text()


def test_shipped_pipeline_loads_as_v_prediction_on_the_cosine_schedule():
    loaded = load_model(str(ASSET))
    assert loaded.schedule.prediction_type == "v_prediction"
    assert loaded.schedule.beta_schedule == "squaredcos_cap_v2"
    assert loaded.kind == "pixel" and loaded.sample_shape == (1, 32, 32)
    x = torch.randn(2, *loaded.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = loaded.denoiser(x, torch.tensor([500, 20]))
    assert out.shape == x.shape and torch.isfinite(out).all() and float(out.std()) > 0.1
