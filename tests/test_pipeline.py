"""The user's whole journey on a tiny model: CLI run/search → export → load → sample, the Python API, the
report, and the bad inputs of that journey (each a clear message, existing results untouched)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import tmpq
from tmpq.cli import app
from tmpq.errors import TmpqError
from tmpq.models.train import TrainConfig, train_ddpm
from tmpq.quant import CalibConfig, QuantSpec

runner = CliRunner()

TINY = ["--calib-samples", "2", "--calib-steps", "3", "--w-bits", "4,8", "--a-bits", "8", "--recon-iters", "4"]
SEARCH = ["--like", "W8A8", "--budget-steps", "3", "--steps", "3", "--fitness", "proxy", "--fitness-samples", "4"]
SEARCH += ["--generations", "2", "--population", "4", "--final-top", "2", *TINY]


def _train(d, seed: int):
    images = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    cfg = TrainConfig(steps=2, batch_size=8, block_out_channels=(8, 16), warmup_steps=1, autocast="off", seed=seed)
    return train_ddpm(images, d / "run", cfg, progress=False)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("model"), 0)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("other"), 1)


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    """`tmpq run` end to end: calibrate, search, final re-scoring, export, report."""
    run = tmp_path_factory.mktemp("runs") / "run"
    res = runner.invoke(
        app, ["run", "--model", str(tiny_model), "--run-dir", str(run), "--final-samples", "6", *SEARCH]
    )
    assert res.exit_code == 0, res.output
    assert "report:" in res.output
    return run


def test_run_writes_search_export_and_report(finished_run):
    summary = json.loads((finished_run / "search.json").read_text())
    labels = [r["label"] for r in summary["final"]["rows"]]
    chosen = summary["grouping_choice"]["chosen"]  # the default --grouping auto picked it from FP's scores
    assert summary["grouping"] == chosen == min(summary["grouping_choice"]["scores"].items(), key=lambda kv: kv[1])[0]
    assert labels[:2] == ["FP, 100 steps", f"FP, 3 steps ({chosen})"] and "top1" in labels
    fp_last = max(i for i, r in enumerate(summary["final"]["rows"]) if r["kind"] == "fp")
    assert labels.index("baseline") == fp_last + 1  # the FP peers first, then uniform PTQ, then the search's best
    fp100 = summary["final"]["rows"][0]
    assert fp100["kind"] == "fp" and len(fp100["timesteps"]) == 100 and fp100["bitops"] == summary["fp_bitops_full_100"]
    for r in summary["final"]["rows"]:
        assert (finished_run / r["grid"]).is_file()
    assert summary["best"]["bitops"] <= summary["budget_bitops"]
    assert summary["provenance"]["inputs_sha256"]["model"] and summary["config"]["fitness"]["seed"] == 0
    html = (finished_run / "report" / "report.html").read_text()
    md = (finished_run / "report" / "report.md").read_text()
    for fig in ("pareto.png", "bits.png", "timesteps.png", "progress.png"):
        assert (finished_run / "report" / fig).stat().st_size > 1000 and fig in html and fig in md
    assert "uniform PTQ" in md and "FP, 100 steps" in html
    speed = json.loads((finished_run / "speed.json").read_text())  # measured on this machine by `tmpq run`
    assert speed["ms_per_image"] and "Measured speed" in md and "Measured speed" in html and "real speed" in md
    manifest = json.loads((finished_run / "export" / "tmpq_compressed.json").read_text())
    assert manifest["info"]["label"] == summary["final"]["best"]["label"]


def test_export_then_load_then_sample_is_bit_identical_to_the_run(finished_run, tmp_path):
    """CLI export in a new 'process' (rebuilt from the run dir) == the exported sampler == CLI sample."""
    out = tmp_path / "exp"
    res = runner.invoke(app, ["export", "--run-dir", str(finished_run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rebuilt = tmpq.CompressionResult.open(finished_run).sampler()
    loaded = tmpq.load(out)
    a = rebuilt.sample(5, seed=3)
    b = loaded.sample(5, seed=3)
    assert torch.equal(a, b)
    res = runner.invoke(
        app,
        ["sample", "--compressed", str(out), "--num-samples", "5", "--seed", "3", "--out", str(tmp_path / "g.png")]
        + ["--save-tensor", str(tmp_path / "s.safetensors")],
    )
    assert res.exit_code == 0, res.output
    assert torch.equal(load_file(str(tmp_path / "s.safetensors"))["images"], b)
    res = runner.invoke(app, ["eval", "--compressed", str(out), "--num-samples", "6", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["timesteps"] == list(loaded.timesteps) and ev["image_forwards"] == 6 * len(loaded.timesteps)
    assert ev["provenance"]["inputs_sha256"]["compressed"] and ev["config"]["compressed"] == str(out)


def test_export_refuses_to_overwrite_and_names_rows(finished_run, tmp_path):
    out = tmp_path / "exp"
    assert runner.invoke(app, ["export", "--run-dir", str(finished_run), "--out", str(out)]).exit_code == 0
    before = (out / "weights.safetensors").read_bytes()
    res = runner.invoke(app, ["export", "--run-dir", str(finished_run), "--out", str(out), "--which", "baseline"])
    assert res.exit_code == 2 and "already holds an export" in res.output
    assert (out / "weights.safetensors").read_bytes() == before
    res = runner.invoke(app, ["export", "--run-dir", str(finished_run), "--out", str(tmp_path / "e2"), "--which", "x"])
    assert res.exit_code == 2 and "choose one of" in res.output


def test_search_ranks_are_rebuilt_from_the_kept_top(finished_run):
    summary = json.loads((finished_run / "search.json").read_text())
    second = tmpq.CompressionResult.open(finished_run).sampler("search:2")
    assert list(second.timesteps) == summary["top"][1]["candidate"]["timesteps"]
    assert second.info["search_fitness"] == summary["top"][1]["value"] >= summary["top"][0]["value"]
    assert (
        tmpq.CompressionResult.open(finished_run).sampler("search:1").info["search_fitness"] == summary["best"]["value"]
    )
    for bad in ("search:0", "search:x", f"search:{len(summary['top']) + 1}"):
        with pytest.raises(TmpqError, match="the search kept its"):
            tmpq.CompressionResult.open(finished_run).sampler(bad)


def test_report_with_a_peer_and_bad_peer(finished_run, tmp_path):
    peer = tmp_path / "peer"
    shutil.copytree(finished_run, peer)
    res = runner.invoke(
        app, ["report", "--run-dir", str(finished_run), "--out", str(tmp_path / "rep"), "--peer", f"other={peer}"]
    )
    assert res.exit_code == 0, res.output
    assert "| other |" in (tmp_path / "rep" / "report.md").read_text()
    res = runner.invoke(app, ["report", "--run-dir", str(finished_run), "--peer", "nolabel"])
    assert res.exit_code == 2 and "LABEL=RUN_DIR" in res.output
    res = runner.invoke(app, ["report", "--run-dir", str(tmp_path / "none")])
    assert res.exit_code == 2 and "tmpq search" in res.output


def test_run_dir_of_another_model_is_refused_and_untouched(finished_run, other_model):
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    res = runner.invoke(app, ["search", "--model", str(other_model), "--run-dir", str(finished_run), *SEARCH])
    assert res.exit_code == 2 and "another model" in res.output and "Traceback" not in res.output
    after = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    assert after == before


def test_budget_below_the_cheapest_candidate_names_the_minimum(tiny_model, tmp_path):
    search = [a for a in SEARCH if a not in ("--like", "W8A8")]  # one budget: --gbitops (with --like it is refused)
    args = ["search", "--model", str(tiny_model), "--run-dir", str(tmp_path / "r"), *search, "--gbitops", "0.000001"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "below the cheapest candidate" in res.output and "GBitOPs:" in res.output


def test_missing_model_path(tmp_path):
    res = runner.invoke(app, ["run", "--model", str(tmp_path / "nope.safetensors"), "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2 and "not found" in res.output
    assert not (tmp_path / "r").exists()


def test_python_api_compress(tiny_model, tmp_path):
    res = tmpq.compress(
        str(tiny_model),
        budget="W8A8@3",
        steps=3,
        run_dir=tmp_path / "api",
        fitness_samples=4,
        final_samples=4,
        generations=2,
        calib=CalibConfig(2, 3),
        quant=QuantSpec(w_bits=(4, 8), a_bits=(8,), reconstruction=None),
        progress=False,
    )
    assert res.best.bitops <= res.search.budget
    assert res.pareto and all(r.bitops <= res.search.budget for r in res.pareto)
    s = res.sampler()
    images = s.sample(3, seed=0)
    assert images.shape == (3, 1, 32, 32) and images.abs().max() <= 1
    out = res.export(tmp_path / "exp")
    assert torch.equal(tmpq.load(out).sample(3, seed=0), images)


@pytest.mark.parametrize(
    ("budget", "kind"),
    [("W6A6", "like"), ("w4a8@20", "like"), (0.05, "fraction"), ("0.1", "fraction"), ("35.1G", "gbitops")],
)
def test_parse_budget(budget, kind):
    assert tmpq.Budget.parse(budget).kind == kind


def test_parse_budget_rejects_nonsense():
    with pytest.raises(TmpqError, match="not understood"):
        tmpq.Budget.parse("cheap")


def test_parse_budget_is_a_deprecated_alias_of_budget_parse():
    with pytest.warns(DeprecationWarning, match="Budget.parse"):
        old = tmpq.parse_budget("W12A16@20")
    assert old == tmpq.Budget.parse("W12A16@20") == tmpq.Budget.like("W12A16", 20)


def test_a_run_opened_in_a_new_process_is_the_same_result(finished_run):
    """CompressionResult.open reads config and Pareto front back from search.json: typed, equal to what ran."""
    opened = tmpq.CompressionResult.open(finished_run)
    summary = json.loads((finished_run / "search.json").read_text())
    assert opened.search is None
    assert opened.config.to_dict() == summary["config"]
    assert tmpq.SearchConfig.from_dict(opened.config.to_dict()) == opened.config
    assert [r.to_json() for r in opened.pareto] == summary["pareto"]
    assert (
        opened.best.candidate.timesteps == tuple(summary["final"]["best"]["candidate"]["timesteps"])
        or list(opened.best.candidate.timesteps) == summary["final"]["best"]["candidate"]["timesteps"]
    )
    with pytest.raises(TmpqError, match="newer tmpq"):
        tmpq.SearchConfig.from_dict({**summary["config"], "warp_drive": True})


def test_old_spellings_warn_and_still_work(finished_run, tmp_path):
    out = tmpq.CompressionResult.open(finished_run).export(tmp_path / "exp")
    with pytest.warns(DeprecationWarning, match="CompressionResult.open"):
        old = tmpq.sampler_from_run(finished_run)
    with pytest.warns(DeprecationWarning, match=r"\.lower\(backend, inplace=True\)"):
        lowered = tmpq.load(out, backend="fake")
    with pytest.warns(DeprecationWarning, match=r"sampler\.lower"):
        tmpq.lower(tmpq.load(out), "fake")
    with pytest.warns(DeprecationWarning, match="to_diffusers"):
        assert callable(tmpq.to_diffusers)
    new = tmpq.load(out)
    assert isinstance(new, tmpq.CompressedSampler)
    assert torch.equal(old.sample(2, seed=1), new.sample(2, seed=1))
    assert torch.equal(lowered.sample(2, seed=1), new.lower("fake").sample(2, seed=1))
    with pytest.raises(AttributeError):
        tmpq.no_such_name  # noqa: B018
