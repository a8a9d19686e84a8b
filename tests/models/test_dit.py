"""Class-conditional DiT pipelines end to end on a tiny random DiTPipeline saved with `save_pretrained`: loading
with class labels, DiTPipeline's guidance, MACs that FlopCounterMode agrees with, block reconstruction over transformer
blocks, and the whole journey search → export → load → backends → DiTPipeline."""

from __future__ import annotations

import pytest
import torch
from class_journey import class_journey
from tiny_pipelines import edited_copy, save_dit_pipeline
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from tmpq.cli import app
from tmpq.errors import TmpqError
from tmpq.models.loading import load_model
from tmpq.quant import CalibConfig, QuantSpec, build_supernet, collect_calibration
from tmpq.sampling.conditioning import Conditioning

runner = CliRunner()
SEARCH = ["--like", "W8A8", "--budget-steps", "3", "--steps", "3", "--generations", "2", "--population", "4"]
SEARCH += ["--calib-samples", "2", "--calib-steps", "3", "--w-bits", "4,8", "--a-bits", "8", "--fitness-samples", "4"]
SEARCH += ["--fitness", "proxy", "--proxy-space", "pixels", "--final-samples", "0", "--device", "cpu"]
SEARCH += ["--lever", "joint", "--recon-iters", "4"]  # mixed bits in the export; BRECQ, cheaply


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return save_dit_pipeline(tmp_path_factory.mktemp("dit") / "pipe")


def _calib(m):
    cond = m.conditioning(2)
    cc = CalibConfig(2, 3, conditioning=cond.digest())
    return collect_calibration(m.denoiser, m.schedule, m.sample_shape, cc, progress=False, cond=cond)


def test_a_dit_pipeline_loads_class_conditional_with_its_vae(dit_dir):
    m = load_model(str(dit_dir))
    assert m.kind == "class2image" and m.sample_shape == (4, 8, 8) and m.image_shape == (3, 16, 16)
    assert m.class_labels == tuple(range(1000)) and m.conditional and m.options == {"guidance_scale": 4.0}
    m = load_model(str(dit_dir), classes=[7, 3], guidance_scale=2.0)
    assert m.conditioning(3).embeddings().tolist() == [7, 3, 7] and m.options["classes"] == [7, 3]
    for bad in ([1000], [-1], []):
        with pytest.raises(TmpqError, match=r"label ids in \[0, 1000\)"):
            load_model(str(dit_dir), classes=bad)
    with pytest.raises(TmpqError, match="give classes"):
        load_model(str(dit_dir), prompts=["a cat"])
    with pytest.raises(TmpqError, match="class-conditional models only"):
        load_model("builtin:fashion", classes=[1])


def test_other_transformers_and_extra_components_are_refused(dit_dir, tmp_path):
    edits = {
        "tmpq loads only": {"transformer": ["diffusers", "HunyuanDiT2DModel"]},
        "needs a DiTTransformer2DModel": {"transformer": ["diffusers", "PixArtTransformer2DModel"]},
        "components": {"text_encoder": ["transformers", "T5EncoderModel"]},
    }
    for i, (why, change) in enumerate(edits.items()):
        with pytest.raises(TmpqError, match=why):
            load_model(str(edited_copy(dit_dir, tmp_path / f"p{i}", change)))


def test_guidance_is_dit_pipelines_formula(dit_dir):
    m = load_model(str(dit_dir), guidance_scale=3.0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([700, 700])
    dit = m.denoiser.unet
    with torch.no_grad():
        got = m.denoiser(x, t, Conditioning(torch.arange(1000), torch.tensor([5, 9])))
        out = dit(torch.cat([x, x]), timestep=torch.cat([t, t]), class_labels=torch.tensor([5, 9, 1000, 1000])).sample
        c, u = out[:, :4].chunk(2)
    assert torch.allclose(got, u + 3.0 * (c - u), atol=1e-6)


def test_macs_per_image_are_flopcounters_and_blocks_reconstruct(dit_dir):
    """Every linear, the patch embedding and both attention matmuls are units; their MACs per image (both halves of
    the guided batch) are what torch's FlopCounterMode counts; BRECQ reconstructs over the transformer blocks."""
    from tmpq.quant.brecq import reconstruction_blocks

    m = load_model(str(dit_dir), classes=[1, 2])
    calib = _calib(m)
    spec = QuantSpec(w_bits=(4, 8), a_bits=(8,), reconstruction="brecq", recon_iters=4, recon_batch=2, recon_rows=4)
    sn = build_supernet(m.denoiser, calib, spec, progress=False)
    kinds = {u.kind for u in sn.units.values()}
    names = list(sn.units)
    assert kinds == {"conv", "linear", "matmul"} and any(n.endswith("norm1.linear") for n in names)  # adaLN
    assert any("timestep_embedder" in n for n in names) and any(n.endswith("proj_out_2") for n in names)
    x, t, c = calib.rows(slice(0, 1))
    sn.set_fp()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        sn(x, t, c)
    assert sn.cost.macs == fc.get_total_flops() // 2
    blocks = {type(dict(sn.model.named_modules())[b]).__name__ for b in reconstruction_blocks(sn)}
    assert "BasicTransformerBlock" in blocks and sn.calibration_info["reconstruction"]["method"] == "brecq"


def test_dit_journey_search_export_load_backends_pipeline(dit_dir, tmp_path):
    run = tmp_path / "run"
    s = class_journey(str(dit_dir), run, SEARCH, 4.0, (3, 16, 16))
    with pytest.raises(TmpqError, match="class-conditional"):
        s.sample(1, prompts=["a cat"])
    pipe = s.to_diffusers()
    assert type(pipe).__name__ == "DiTPipeline"
    out = pipe(class_labels=[2], generator=torch.Generator().manual_seed(5), guidance_scale=4.0, output_type="np")
    mine = (s.sample(1, seed=5, classes=[2]) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(out.images - mine).max() < 1e-5
    grid = tmp_path / "g.png"
    args = ["sample", "--compressed", str(run / "export"), "--classes", "4", "--out", str(grid), "--num-samples", "2"]
    res = runner.invoke(app, [*args, "--device", "cpu"])
    assert res.exit_code == 0 and grid.is_file(), res.output
