"""Text-conditional PixArt-α/Σ pipelines end to end on a tiny random pipeline saved with `save_pretrained` (T5
encoder, character tokenizer): loading with prompts and their attention masks, PixArtAlphaPipeline's guidance, MACs
that FlopCounterMode agrees with, and the whole journey search → export → load → backends → PixArt pipeline."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import edited_copy, save_pixart_pipeline
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

import tmpq
from tmpq.cli import app
from tmpq.errors import TmpqError
from tmpq.models.loading import load_model
from tmpq.quant import CalibConfig, QuantSpec, build_supernet, collect_calibration

runner = CliRunner()
SEARCH = ["--like", "W8A8", "--budget-steps", "3", "--steps", "3", "--generations", "2", "--population", "4"]
SEARCH += ["--calib-samples", "2", "--calib-steps", "3", "--w-bits", "4,8", "--a-bits", "8", "--fitness-samples", "4"]
SEARCH += ["--fitness", "proxy", "--proxy-space", "pixels", "--final-samples", "0", "--device", "cpu"]
SEARCH += ["--lever", "joint", "--recon-iters", "4"]  # mixed bits in the export; BRECQ, cheaply
PROMPTS = ["a red shirt", "Blue TROUSERS  "]


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    return save_pixart_pipeline(tmp_path_factory.mktemp("pixart") / "pipe")


def _pipe_call(pipe, prompt: str, seed: int, steps: int, g: float):
    return pipe(
        prompt,
        num_inference_steps=steps,
        height=16,
        width=16,
        guidance_scale=g,
        use_resolution_binning=False,  # the tiny model's size has no aspect-ratio bins
        clean_caption=False,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images


def test_a_pixart_pipeline_loads_text_conditional_with_masks(pixart_dir):
    m = load_model(str(pixart_dir), prompts=PROMPTS)
    assert m.kind == "text2image" and m.pipeline_class == "PixArtAlphaPipeline"
    assert m.sample_shape == (4, 8, 8) and m.image_shape == (3, 16, 16)
    assert m.options == {"prompts": PROMPTS, "guidance_scale": 4.5}
    table = m.prompt_table()
    assert table.shape == (2, 120, 17)  # 120 tokens (PixArt-α), T5 width 16 + the mask
    assert table[0, :, -1].sum() == len("aredshirt") + 1  # a token per character (word marks merge), then </s>
    assert torch.equal(table[1, :, -1], m.text_encoder(["blue trousers"])[0, :, -1])  # lower-cased and stripped
    with pytest.raises(TmpqError, match="not to"):
        load_model(str(pixart_dir), classes=[1])


def test_pixart_sigma_pads_prompts_to_300_tokens(tmp_path):
    m = load_model(str(save_pixart_pipeline(tmp_path / "sigma", "PixArtSigmaPipeline")), prompts=["a bag"])
    assert m.pipeline_class == "PixArtSigmaPipeline" and m.prompt_table().shape == (1, 300, 17)


def test_guidance_and_masks_are_the_pipelines(pixart_dir):
    """The sampler's DDIM on the PixArt denoiser gives PixArtAlphaPipeline's images (its own encode_prompt, masks,
    [negative; prompt] batch, guidance and learned-sigma split) from the same noise."""
    from diffusers import PixArtAlphaPipeline

    from tmpq.sampling.ddim import DDIMSampler, generate

    m = load_model(str(pixart_dir), prompts=["a red shirt"], guidance_scale=3.0)
    pipe = PixArtAlphaPipeline.from_pretrained(str(pixart_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(4)
    ts = pipe.scheduler.timesteps.tolist()
    mine = generate(m.denoiser, DDIMSampler(m.schedule, ts), 1, m.sample_shape, seed=3, cond=m.conditioning(1))
    mine = (m.decode(mine) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    theirs = _pipe_call(pipe, "a red shirt", seed=3, steps=4, g=3.0)
    assert abs(theirs - mine).max() < 1e-5
    # the mask matters: attending to the padding changes the prediction
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    cond = m.conditioning(1)
    with torch.no_grad():
        base = m.denoiser(x, t, cond)
        unmasked = type(cond)(cond.table.clone(), cond.ids)
        unmasked.table[..., -1] = 1.0
        assert not torch.allclose(base, m.denoiser(x, t, unmasked))


def test_macs_are_flopcounters_and_other_layouts_are_refused(pixart_dir, tmp_path):
    m = load_model(str(pixart_dir), prompts=["a red shirt"])
    cond = m.conditioning(2)
    calib = collect_calibration(
        m.denoiser, m.schedule, m.sample_shape, CalibConfig(2, 3, conditioning=cond.digest()), progress=False, cond=cond
    )
    sn = build_supernet(m.denoiser, calib, QuantSpec(w_bits=(4, 8), a_bits=(8,), reconstruction=None), progress=False)
    names = list(sn.units)
    assert {u.kind for u in sn.units.values()} == {"conv", "linear", "matmul"}
    assert any("caption_projection" in n for n in names) and any("adaln_single" in n for n in names)
    assert any(n.endswith("attn2.processor.qk") for n in names)  # cross-attention over the prompt tokens
    x, t, c = calib.rows(slice(0, 1))
    sn.set_fp()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        sn(x, t, c)
    assert sn.cost.macs == fc.get_total_flops() // 2
    for i, (why, change) in enumerate(
        {
            "missing": {"text_encoder": [None, None]},
            "tmpq loads only": {"transformer": ["diffusers", "HunyuanDiT2DModel"]},
            "needs a PixArtTransformer2DModel": {"transformer": ["diffusers", "DiTTransformer2DModel"]},
        }.items()
    ):
        with pytest.raises(TmpqError, match=why):
            load_model(str(edited_copy(pixart_dir, tmp_path / f"p{i}", change)))


def test_pixart_journey_search_export_load_backends_pipeline(pixart_dir, tmp_path):
    run = tmp_path / "run"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red shirt\na blue bag\n")
    args = ["run", "--model", str(pixart_dir), "--prompts", str(prompts), "--run-dir", str(run), *SEARCH]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    s = tmpq.load(run / "export")
    assert s.parts.kind == "text2image" and s.parts.pipeline_class == "PixArtAlphaPipeline"
    ref = tmpq.CompressionResult.open(run).sampler().sample(2, seed=2, prompts=["a red shirt"])
    got = s.sample(2, seed=2, prompts=["a red shirt"])
    assert got.shape == (2, 3, 16, 16) and torch.equal(got, ref)
    assert not torch.equal(s.sample(2, seed=2, prompts=["a blue bag"]), got)  # the prompt matters
    assert torch.equal(s.lower("packed").sample(2, seed=2, prompts=["a red shirt"]), got)
    assert (s.lower("int8").sample(2, seed=2, prompts=["a red shirt"]) - got).abs().mean() < 0.05
    pipe = s.to_diffusers()
    assert type(pipe).__name__ == "PixArtAlphaPipeline"
    out = _pipe_call(pipe, "a red shirt", seed=5, steps=50, g=float(s.supernet.model.guidance_scale))
    mine = (s.sample(1, seed=5, prompts=["a red shirt"]) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(out - mine).max() < 1e-5
