"""A flow-matching pipeline end to end (a pixel UNet2DModel with FlowMatchEulerDiscreteScheduler, saved with
`save_pretrained`): loading gives a FlowSchedule and calls the network at σ · T, FP sampling equals the diffusers
pipeline, and search → export → load → to_diffusers keeps every schedule starting from pure noise."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler
from tiny_pipelines import save_flow_pixel_pipeline
from typer.testing import CliRunner

import tmpq
from tmpq.cli import app
from tmpq.models.loading import load_model
from tmpq.sampling.ddim import DDIMSampler, generate
from tmpq.sampling.schedules import FlowSchedule

runner = CliRunner()
SEARCH = ["--like", "W8A8", "--budget-steps", "4", "--steps", "4", "--generations", "2", "--population", "4"]
SEARCH += ["--calib-samples", "2", "--calib-steps", "4", "--w-bits", "4,8", "--a-bits", "8", "--fitness-samples", "4"]
SEARCH += ["--fitness", "proxy", "--proxy-space", "pixels", "--final-samples", "0", "--device", "cpu"]
SEARCH += ["--lever", "joint", "--recon-iters", "4"]  # mixed bits in the export; BRECQ, cheaply


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory):
    return save_flow_pixel_pipeline(tmp_path_factory.mktemp("flow") / "pipe")


def _images(pipe, seed: int, steps: int):
    return pipe(
        batch_size=1, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np"
    )


def test_flow_pipeline_samples_as_diffusers_does(flow_dir):
    m = load_model(str(flow_dir))
    assert isinstance(m.schedule, FlowSchedule) and m.schedule.shift == 3.0 and m.kind == "pixel"
    ts = m.schedule.timesteps("uniform", 10)
    mine = generate(m.denoiser, DDIMSampler(m.schedule, ts), 1, m.sample_shape, seed=4, progress=False)
    pipe = DDPMPipeline.from_pretrained(str(flow_dir))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    theirs = _images(pipe, 4, 10).images
    mine = (mine / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(theirs - mine).max() < 1e-5


def test_flow_journey_search_export_load_pipeline(flow_dir, tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(app, ["run", "--model", str(flow_dir), "--run-dir", str(run), *SEARCH])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "search.json").read_text())
    assert summary["noise_schedule"]["kind"] == "flow"
    s = tmpq.load(run / "export")
    assert isinstance(s.schedule, FlowSchedule) and s.timesteps[0] == 999  # every schedule starts from pure noise
    got = s.sample(2, seed=1)
    assert torch.equal(got, tmpq.CompressionResult.open(run).sampler().sample(2, seed=1))
    assert torch.equal(s.lower("packed").sample(2, seed=1), got)
    pipe = s.to_diffusers()
    assert type(pipe.scheduler).__name__ == "SearchedFlowMatchScheduler"
    out = _images(pipe, 3, 50).images  # the searched steps whatever num_inference_steps says
    mine = (s.sample(1, seed=3) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(out - mine).max() < 1e-5
