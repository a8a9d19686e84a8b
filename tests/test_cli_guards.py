"""Bad input and faults at the command line: one line naming the problem and the fix, exit 2, no traceback,
refused before any compute, and nothing of the user's touched."""

from __future__ import annotations

import importlib
import time

import pytest
from typer.testing import CliRunner

from tmpq.cli import app
from tmpq.errors import TmpqError
from tmpq.search.parallel import check_ray_address

runner = CliRunner()


def _refused(args: list[str], match: str, code: int = 2) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], res.output
    return lines[0]


def test_train_never_writes_its_card_over_a_users_readme(tmp_path):
    proj = tmp_path / "userproj"
    proj.mkdir()
    (proj / "README.md").write_text("my notes")
    _refused(["train", "--run-dir", str(tmp_path / "r"), "--out", str(proj / "README")], ".safetensors")
    (proj / "w.safetensors").write_text("not tmpq's")
    _refused(["train", "--run-dir", str(tmp_path / "r"), "--out", str(proj / "w.safetensors")], "not written by")
    (proj / "m.md").write_text("my card")
    _refused(["train", "--run-dir", str(tmp_path / "r"), "--out", str(proj / "m.safetensors")], "not this model's card")
    assert (proj / "README.md").read_text() == "my notes" and (proj / "w.safetensors").read_text() == "not tmpq's"
    assert not (tmp_path / "r").exists()  # refused before training started


@pytest.mark.parametrize(
    "args, match",
    [
        (["--like", "W6A6", "--bitops", "0.1"], "give one budget"),
        (["--like", "W6A6", "--gbitops", "3"], "give one budget"),
        (["--generations", "0"], "generations"),
        (["--population", "0"], "--population"),
        (["--phases", "500,500"], "repeats"),
        (["--phases", "x"], "--phases"),
        (["--phases", "0"], "--phases"),
        (["--like", "W7A7"], "--w-bits"),
        (["--like", "W0A0"], "between 1 and 16"),
        (["--like", "W10A10"], "10-bit weights are not among"),
        (["--like", "W6"], "not of the form"),
        (["--steps", "12-8"], "--steps"),
        (["--budget-steps", "-3"], "--budget-steps"),
        (["--lever", "timesteps", "--fixed-precision", "W7A7"], "--fixed-precision"),
        (["--threads", "-2"], "--threads"),
        (["--grouping", "foo"], "--grouping"),
        (["--final-top", "0"], "--final-top"),
        (["--final-samples", "-5"], "--final-samples"),
        (["--fid-reference", "/nonexistent"], "--fid-reference"),
        (["--proxy-reference-steps", "0"], "reference steps"),
        (["--seed-from", "/nonexistent"], "--seed-from"),
        (["--reconstruction", "brecq2"], "--reconstruction"),
        (["--reconstruction", "adaround", "--recon-preset", "fast"], "preset"),
        (["--recon-inputs", "upstream"], "--recon-inputs"),
        (["--reconstruction", "none", "--recon-inputs", "quantized"], "needs reconstruction='brecq'"),
        (["--format8", "fp4"], "--format8"),
    ],
)
def test_search_options_are_checked_before_any_compute(tmp_path, args, match):
    run_dir = tmp_path / "run"
    _refused(["search", "--run-dir", str(run_dir), *args], match)
    assert not run_dir.exists()


def test_sample_outputs_are_checked_before_sampling(tmp_path):
    _refused(["sample", "--out", str(tmp_path)], "is a directory")
    _refused(["sample", "--out", str(tmp_path / "x.txt")], ".png")
    _refused(["sample", "--out", str(tmp_path / "a.png"), "--save-tensor", str(tmp_path)], "is a directory")
    f = tmp_path / "file"
    f.write_text("")
    _refused(["sample", "--out", str(f / "a.png")], "is a file")


def test_options_that_would_be_ignored_are_refused(tmp_path):
    _refused(["sample", "--out", str(tmp_path / "a.png"), "--compressed", str(tmp_path), "--steps", "5"], "--steps")
    _refused(["sample", "--out", str(tmp_path / "a.png"), "--backend", "int8"], "--compressed")
    _refused(["eval", "--out", str(tmp_path / "e"), "--backend", "int8"], "--compressed")
    _refused(["eval", "--out", str(tmp_path / "e"), "--compressed", str(tmp_path), "--schedule", "uniform"], "drop")


@pytest.mark.parametrize(
    "args, match",
    [(["--eta", "nan"], "--eta"), (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-4"], "--batch-size")],
)
def test_eval_numbers_are_checked(tmp_path, args, match):
    _refused(["eval", "--out", str(tmp_path / "e"), *args], match)


def test_any_error_is_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    evaluate_module = importlib.import_module("tmpq.evaluate")  # the package exports a function of that name

    def boom(*a, **k):
        raise ValueError("boom")

    monkeypatch.setattr(evaluate_module, "evaluate", boom)
    line = _refused(["eval", "--out", str(tmp_path / "e")], "unexpected ValueError: boom", code=1)
    assert "--debug" in line
    res = runner.invoke(app, ["--debug", "eval", "--out", str(tmp_path / "e")])
    assert isinstance(res.exception, ValueError)

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system", "/ro/run")

    monkeypatch.setattr(evaluate_module, "evaluate", read_only)
    _refused(["eval", "--out", str(tmp_path / "e")], "read-only; pick a writable location")


def test_train_from_missing_or_foreign_weights_is_refused_before_the_run_exists(tmp_path):
    args = ["train", "--run-dir", str(tmp_path / "t"), "--init-from", str(tmp_path / "w.safetensors")]
    _refused(args, "not found")
    (tmp_path / "w.safetensors").write_text("my notes")
    _refused(args, "readable")
    assert not (tmp_path / "t").exists() and (tmp_path / "w.safetensors").read_text() == "my notes"


def test_an_unreachable_ray_address_fails_at_once():
    start = time.perf_counter()
    with pytest.raises(TmpqError, match="no Ray cluster answers at 127.0.0.1:1"):
        check_ray_address("127.0.0.1:1")
    assert time.perf_counter() - start < 30


def test_train_with_a_bad_architecture_leaves_no_run_directory(tmp_path):
    _refused(["train", "--run-dir", str(tmp_path / "t"), "--channels", "7,14"], "divisible")
    assert not (tmp_path / "t").exists()  # so the corrected command is not refused as "a different config"


def test_repeated_channel_widths_are_a_valid_architecture():
    from tmpq.cli import parse_ints

    assert parse_ints("32,32,64", "--channels", distinct=False) == (32, 32, 64)
    with pytest.raises(TmpqError, match="repeats"):
        parse_ints("8,8", "--steps")
