"""The journey every class-conditional model takes in the tests: `tmpq run` on classes 1, 2, 3, then the export
loaded back must sample what the run's own sampler samples, the class must matter, and the backends must agree."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

import tmpq
from tmpq.cli import app


def class_journey(model: str, run: Path, search_args: list[str], guidance: float, image_shape: tuple[int, ...]):
    """Runs the journey and returns the loaded export (for each model kind's own pipeline checks)."""
    res = CliRunner().invoke(app, ["run", "--model", model, "--classes", "1,2,3", "--run-dir", str(run), *search_args])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "search.json").read_text())
    assert summary["model_options"] == {"guidance_scale": guidance, "classes": [1, 2, 3]}
    s = tmpq.load(run / "export")
    assert s.parts.kind == "class2image" and s.parts.class_labels == (1, 2, 3)
    ref = tmpq.CompressionResult.open(run).sampler().sample(3, seed=2, classes=[1, 2])
    got = s.sample(3, seed=2, classes=[1, 2])
    assert got.shape == (3, *image_shape) and torch.equal(got, ref)
    assert not torch.equal(s.sample(3, seed=2, classes=[7]), got)  # the class matters
    assert torch.equal(s.lower("packed").sample(3, seed=2, classes=[1, 2]), got)
    assert (s.lower("int8").sample(3, seed=2, classes=[1, 2]) - got).abs().mean() < 0.05
    return s
