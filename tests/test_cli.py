from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tmpq.cli import app
from tmpq.data import load_fashion_mnist
from tmpq.images import to_uint8
from tmpq.models.train import TrainConfig, train_ddpm

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    images = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = TrainConfig(steps=2, batch_size=8, block_out_channels=(8, 16), warmup_steps=1, autocast="off")
    return train_ddpm(images, d / "run", cfg, progress=False)


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    x, _ = load_fashion_mnist("test", limit=40)
    for i, a in enumerate(to_uint8(x)):
        Image.fromarray(a[..., 0]).save(d / f"{i:03d}.png")
    return d


def test_eval_writes_json_and_grid(tiny_model, real_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPQ_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    res = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_model),
            "--steps",
            "2",
            "--schedule",
            "uniform",
            "--num-samples",
            "12",
            "--batch-size",
            "5",
            "--reference",
            str(real_folder),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((out / "eval.json").read_text())
    assert data["timesteps"] == [500, 0]
    assert data["config"]["num_samples"] == 12 and data["image_forwards"] == 24
    assert data["fid"] > 0 and data["inception_score"] >= 1.0
    assert "torch" in data["provenance"]["versions"] and data["provenance"]["inputs_sha256"]["model"]
    assert (out / "samples.png").stat().st_size > 0


def test_explicit_timesteps_and_sample(tiny_model, tmp_path):
    out = tmp_path / "g.png"
    res = runner.invoke(
        app, ["sample", "--model", str(tiny_model), "--timesteps", "999,400,3", "--num-samples", "4", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert Image.open(out).size[0] > 0


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["eval", "--model", "/nonexistent/m.safetensors"], "not found"),
        (["sample", "--timesteps", "5,10"], "strictly decreasing"),
        (["sample", "--timesteps", "5,x"], "comma-separated integers"),
        (["sample", "--schedule", "cosine"], "unknown schedule"),
        (["sample", "--timesteps", "2000,1"], "outside"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_model, args, msg, tmp_path):
    if args[0] == "sample" and "--model" not in args:
        args = [*args, "--model", str(tiny_model), "--out", str(tmp_path / "x.png")]
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert msg in res.output and "Traceback" not in res.output


def test_calibrate_then_search_on_a_tiny_model(tiny_model, tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(
        app,
        [
            "calibrate",
            "--model",
            str(tiny_model),
            "--run-dir",
            str(run),
            "--calib-samples",
            "2",
            "--calib-steps",
            "3",
            "--w-bits",
            "4,8",
            "--a-bits",
            "8",
            "--recon-iters",
            "4",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "quantizable units" in res.output and (run / "supernet" / "supernet.json").is_file()
    args = [
        "search",
        "--model",
        str(tiny_model),
        "--run-dir",
        str(run),
        "--like",
        "W8A8",
        "--budget-steps",
        "3",
        "--steps",
        "3",
        "--fitness",
        "proxy",
        "--fitness-samples",
        "4",
        "--final-samples",
        "0",
        "--generations",
        "2",
        "--population",
        "4",
        *["--calib-samples", "2", "--calib-steps", "3", "--w-bits", "4,8", "--a-bits", "8", "--recon-iters", "4"],
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads((run / "search.json").read_text())
    assert out["best"]["bitops"] <= out["budget_bitops"] and "timesteps:" in res.output
    assert "calibrate weights" not in res.output  # the saved super-network was reused, not rebuilt
    res = runner.invoke(app, ["report", "--run-dir", str(run)])  # a run without final re-scoring still reports
    assert res.exit_code == 0, res.output
    md = (run / "report" / "report.md").read_text()
    assert "tmpq search, best" in md and "bits.png" in md
    seeded = tmp_path / "seeded"
    args[args.index("--run-dir") + 1] = str(seeded)
    res = runner.invoke(app, [*args, "--seed-from", str(run), "--proxy-reference-steps", "6"])
    assert res.exit_code == 0, res.output
    again = json.loads((seeded / "search.json").read_text())
    assert again["config"]["seed_from"] == [str(run)] and again["config"]["fitness"]["reference_steps"] == 6
    assert "seeded by 1 earlier search:" in res.output
    records = json.loads((seeded / "search_state.json").read_text())["records"].values()
    assert out["best"]["candidate"] in [r["candidate"] for r in records if r["generation"] == 0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["search", "--bitops", "2"], "fraction must be in"),
        (["search", "--lever", "both"], "lever must be one of"),
        (["search", "--like", "8bit"], "WxAy"),
        (["search", "--preset", "fast"], "--preset"),
        (["search", "--steps", "a-b"], "comma-separated integers"),
        (["search", "--seed-from", "no/such/run", "--run-dir", "{tmp}/s"], "no finished search"),
        (["calibrate", "--w-bits", "9"], "not supported"),
    ],
)
def test_search_and_calibrate_bad_options(args, message, tmp_path):
    res = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert res.exit_code == 2 and message in res.output, res.output


def test_python_dash_m_tmpq_is_the_same_command_line():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "tmpq", "search", "--like", "W6"], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert "not of the form WxAy" in res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr


def test_entry_points_take_their_defaults_from_the_config_classes():
    """One default per setting: the CLI's options and compress() use the config classes' own defaults."""
    import inspect

    import tmpq
    from tmpq.cli import app
    from tmpq.evaluate import EvalConfig
    from tmpq.quant.calibration import CalibConfig
    from tmpq.quant.config import QuantSpec
    from tmpq.search import EvolutionConfig, FitnessConfig, SearchConfig

    commands = {
        c.name or c.callback.__name__: inspect.signature(c.callback).parameters for c in app.registered_commands
    }
    search, fit, cfg = commands["run"], FitnessConfig(), SearchConfig()
    expected = {
        "fitness": fit.kind,
        "fitness_samples": fit.num_samples,
        "proxy_space": fit.proxy_space,
        "proxy_stat": fit.proxy_stat,
        "proxy_reference_steps": fit.reference_steps,
        "grouping": cfg.grouping,
        "lever": cfg.lever,
        "fixed_precision": cfg.fixed_precision,
        "final_samples": cfg.final_samples,
        "final_top": cfg.final_top,
        "staged": cfg.staged,
        "fid_reference": cfg.fid_reference,
        "budget_steps": cfg.budget.steps,
        "calib_samples": CalibConfig().num_samples,
        "calib_steps": CalibConfig().num_steps,
        "w_bits": ",".join(map(str, QuantSpec().w_bits)),
        "a_bits": ",".join(map(str, QuantSpec().a_bits)),
        "reconstruction": QuantSpec().reconstruction or "none",
        "recon_inputs": QuantSpec().recon_inputs,
    }
    for name, value in expected.items():
        assert search[name].default == value, name
        assert commands["search"][name].default == value, name
    assert commands["calibrate"]["reconstruction"].default == QuantSpec().reconstruction
    assert commands["eval"]["num_samples"].default == EvalConfig().num_samples
    assert cfg.evolution == EvolutionConfig() == EvolutionConfig.tmpq()
    assert EvolutionConfig.reference().population == 50 and not EvolutionConfig.reference().repair
    api = inspect.signature(tmpq.compress).parameters
    assert api["fitness"].default == fit.kind and api["fitness_samples"].default == fit.num_samples
    assert api["final_samples"].default == cfg.final_samples and api["budget"].default == cfg.budget


def test_eval_compares_with_an_earlier_evaluation_on_the_same_seeds(tiny_model, real_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPQ_CACHE", str(tmp_path / "cache"))
    base = ["eval", "--model", str(tiny_model), "--schedule", "uniform", "--num-samples", "6", "--reference"]
    base += [str(real_folder)]
    first = runner.invoke(app, [*base, "--steps", "2", "--out", str(tmp_path / "a"), "--save-images"])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "a" / "images.safetensors").is_file()
    res = runner.invoke(app, [*base, "--steps", "3", "--out", str(tmp_path / "b"), "--compare-to", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    fidelity = json.loads((tmp_path / "b" / "eval.json").read_text())["fidelity"]
    assert fidelity["fid"] > 0 and 0 < fidelity["psnr_db"] < 60 and "PSNR" in res.output
    before = (tmp_path / "a" / "eval.json").read_bytes()
    for args, why in [
        (["--steps", "3", "--out", str(tmp_path / "a"), "--compare-to", str(tmp_path / "a")], "another --out"),
        (
            ["--steps", "3", "--seed", "5", "--out", str(tmp_path / "c"), "--compare-to", str(tmp_path / "a")],
            "--seed 0",
        ),
        (["--steps", "3", "--out", str(tmp_path / "c"), "--compare-to", str(tmp_path / "nothing")], "save_images"),
    ]:
        bad = runner.invoke(app, [*base, *args])
        assert bad.exit_code == 2 and why in bad.output and "Traceback" not in bad.output, bad.output
    assert (tmp_path / "a" / "eval.json").read_bytes() == before
