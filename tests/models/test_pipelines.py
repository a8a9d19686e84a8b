"""Latent and text-to-image pipelines end to end on tiny random models saved with `save_pretrained`:
load → calibrate → search → export → load → sample, the FP parts left untouched, prompts that matter."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tiny_pipelines import save_latent_pipeline, save_text2image_pipeline
from typer.testing import CliRunner

import tmpq
from tmpq.cli import app
from tmpq.errors import TmpqError
from tmpq.models.loading import load_model
from tmpq.quant import CalibConfig, QuantSpec
from tmpq.quant.layers import QuantConv2d, QuantLinear
from tmpq.quant.supernet import SuperNet, model_fingerprint
from tmpq.sampling.conditioning import Conditioning

runner = CliRunner()
SEARCH = ["--like", "W8A8", "--budget-steps", "3", "--steps", "3", "--generations", "2", "--population", "4"]
SEARCH += ["--calib-samples", "2", "--calib-steps", "3", "--w-bits", "4,8", "--a-bits", "8", "--fitness-samples", "4"]
SEARCH += ["--fitness", "proxy", "--proxy-space", "pixels", "--final-samples", "0"]
SEARCH += ["--lever", "joint", "--recon-iters", "4"]  # mixed bits in the export; BRECQ, cheaply


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    return save_latent_pipeline(tmp_path_factory.mktemp("ldm") / "pipe")


@pytest.fixture(scope="module")
def t2i_dir(tmp_path_factory):
    return save_text2image_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


def _no_twins(module: torch.nn.Module) -> bool:
    return not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in module.modules())


def test_latent_pipeline_loads_with_latent_shape_and_fp_decoder(latent_dir):
    m = load_model(str(latent_dir))
    assert m.kind == "latent" and m.pipeline_class == "LDMPipeline" and m.decoder.key == "vqvae"
    assert m.sample_shape == (4, 8, 8) and m.image_shape == (3, 16, 16)
    assert not m.schedule.clip_sample and m.schedule.beta_schedule == "scaled_linear"  # from the scheduler config
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = m.decoder.vae.decode(z / m.decoder.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert torch.equal(m.decode(z), ref) and m.decoder.scaling_factor == 0.5
    with pytest.raises(TmpqError, match="text-to-image pipelines only"):
        load_model(str(latent_dir), prompts=["a cat"])


def test_latent_search_export_load_sample(latent_dir, tmp_path):
    """Only the UNet is quantized (the autoencoder keeps its weights and layers), samples are decoded images,
    and the export carries the autoencoder and reloads bit-identically."""
    run, out = tmp_path / "run", tmp_path / "exp"
    res = runner.invoke(app, ["search", "--model", str(latent_dir), "--run-dir", str(run), *SEARCH])
    assert res.exit_code == 0, res.output
    calib = tmpq.CalibrationSet.load(run / "calib.safetensors")
    assert calib.x.shape == (2 * 3, 4, 8, 8) and calib.cond_ids is None  # latents, not images
    assert runner.invoke(app, ["export", "--run-dir", str(run), "--out", str(out)]).exit_code == 0
    manifest = json.loads((out / "tmpq_compressed.json").read_text())
    assert manifest["kind"] == "latent" and manifest["parts"]["vqvae"]["class"] == "AutoencoderKL"
    assert any(k.startswith("vqvae/") for k in manifest["files"])

    s = tmpq.CompressionResult.open(run).sampler()
    assert all(n.startswith("unet.") for n in s.supernet.units) and _no_twins(s.parts.decoder.vae)
    fresh = load_model(str(latent_dir)).decoder.vae
    assert model_fingerprint(fresh) == model_fingerprint(s.parts.decoder.vae)
    back = tmpq.load(out)
    images = back.sample(3, seed=1)
    assert images.shape == (3, 3, 16, 16) and images.abs().max() <= 1
    assert torch.equal(images, s.sample(3, seed=1))
    latents = back.sample(3, seed=1, decode=False)
    assert latents.shape == (3, 4, 8, 8) and torch.equal(back.parts.decoder(latents), images)
    with pytest.raises(TmpqError, match="unconditional"):
        back.sample(1, prompts=["a cat"])


def test_damaged_fp_part_is_refused(latent_dir, tmp_path):
    run, out = tmp_path / "run", tmp_path / "exp"
    assert runner.invoke(app, ["search", "--model", str(latent_dir), "--run-dir", str(run), *SEARCH]).exit_code == 0
    tmpq.CompressionResult.open(run).sampler().export(out)
    cfg = out / "vqvae" / "config.json"
    cfg.write_text(cfg.read_text().replace('"latent_channels": 4', '"latent_channels": 3'))
    with pytest.raises(TmpqError, match="checksum"):
        tmpq.load(out)
    cfg.write_text(cfg.read_text().replace('"latent_channels": 3', '"latent_channels": 4'))
    manifest = out / "tmpq_compressed.json"
    original = manifest.read_text()
    for library, klass, match in (("os", "system", "only"), ("diffusers", "NoSuchModel", "no class")):
        m = json.loads(original)
        m["parts"]["vqvae"] |= {"library": library, "class": klass}
        manifest.write_text(json.dumps(m))
        with pytest.raises(TmpqError, match=match):  # a manifest never makes tmpq import or call something else
            tmpq.load(out)


def test_text2image_loads_prompts_and_guidance(t2i_dir, tmp_path):
    m = load_model(str(t2i_dir))
    assert m.kind == "text2image" and m.conditional and len(m.prompts) >= 8  # the shipped default list
    assert float(m.denoiser.guidance_scale) == 7.5 and m.sample_shape == (4, 8, 8)
    table = m.prompt_table()
    assert table.shape == (len(m.prompts), 16, 16)
    c = m.conditioning(5)
    assert c.ids.tolist() == [0, 1, 2, 3, 4] and torch.equal(c.embeddings(), table[:5])
    with pytest.raises(TmpqError, match="needs prompts"):
        m.denoiser(torch.randn(1, 4, 8, 8), torch.tensor([5]))
    with pytest.raises(TmpqError, match="guidance scale must be >= 1"):
        load_model(str(t2i_dir), guidance_scale=0.5)


def test_classifier_free_guidance_is_diffusers_formula(t2i_dir):
    m = load_model(str(t2i_dir), prompts=["a red car"], guidance_scale=4.0)
    unet, text = m.denoiser.unet, m.text_encoder
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([900, 20])
    cond = Conditioning.cycle(m.prompt_table(), 2)
    with torch.no_grad():
        c = unet(x, t, encoder_hidden_states=text(["a red car"] * 2)).sample
        u = unet(x, t, encoder_hidden_states=text(["", ""])).sample
        eps = m.denoiser(x, t, cond)
    assert torch.allclose(eps, u + 4.0 * (c - u), atol=1e-5)
    one = load_model(str(t2i_dir), prompts=["a red car"], guidance_scale=1.0)
    with torch.no_grad():
        assert torch.allclose(one.denoiser(x, t, cond), c, atol=1e-5)


def test_cross_attention_is_quantized_and_exact_in_fp(t2i_dir):
    """The quantized attention processor handles encoder_hidden_states: diffusers' output at full precision (to
    float rounding: diffusers runs SDPA, the twin explicit matmuls), close at W8A8, and both matmuls of every
    cross-attention are units of their own."""
    m = load_model(str(t2i_dir), prompts=["a red car", "a blue sky"])
    calib = tmpq.collect_calibration(
        m.denoiser,
        m.schedule,
        m.sample_shape,
        CalibConfig(2, 3, conditioning=m.conditioning(2).digest()),
        progress=False,
        cond=m.conditioning(2),
    )
    x, t, c = calib.rows(slice(0, 4))
    with torch.no_grad():
        ref = m.denoiser(x, t, c)
        sn = tmpq.build_supernet(
            m.denoiser, calib, QuantSpec(w_bits=(8,), a_bits=(8,), reconstruction=None), progress=False
        )
        cross = [n for n in sn.units if ".attn2.processor." in n]
        assert cross and {n.rsplit(".", 1)[1] for n in cross} == {"qk", "av"}
        assert any(".attn2.to_k" in n for n in sn.units)  # the projections of the text embeddings too
        sn.set_fp()
        assert torch.allclose(sn(x, t, c), ref, atol=1e-4)
        sn.set_config(sn.uniform_config(8, 8))
        q = sn(x, t, c)
    assert not torch.equal(q, ref) and (q - ref).pow(2).mean() < 0.05 * ref.pow(2).mean()
    assert _no_twins(m.text_encoder.text_encoder)
    assert calib.cond_table.shape[0] == 2 and calib.cond_ids.tolist() == [0, 1] * 3  # table once, ids per row


def test_text2image_reconstructs_blocks_on_its_prompted_calibration(t2i_dir):
    """BRECQ on a text-to-image UNet: transformer, attention and ResNet blocks (fed the guidance-doubled batch and
    the text embeddings) each learn rounding and activation steps, and the quantized model is no further from FP."""
    from tmpq.quant.brecq import reconstruction_blocks

    prompts = ["a red car", "a blue sky"]
    m = load_model(str(t2i_dir), prompts=prompts)
    cond = m.conditioning(2)
    calib = tmpq.collect_calibration(
        m.denoiser, m.schedule, m.sample_shape, CalibConfig(2, 3, conditioning=cond.digest()), progress=False, cond=cond
    )
    spec = QuantSpec(w_bits=(4,), a_bits=(8,), reconstruction=None)
    plain = tmpq.build_supernet(load_model(str(t2i_dir), prompts=prompts).denoiser, calib, spec, progress=False)
    learned = replace(spec, reconstruction="brecq", recon_iters=20, recon_rows=6)
    sn = tmpq.build_supernet(m.denoiser, calib, learned, progress=False)
    kinds = {type(dict(sn.model.named_modules())[b]).__name__ for b in reconstruction_blocks(sn)}
    assert {"ResnetBlock2D", "Attention", "BasicTransformerBlock"} <= kinds
    assert sn.calibration_info["reconstruction"]["method"] == "brecq"
    x, t, c = calib.rows(slice(0, 6))
    errs = []
    with torch.no_grad():
        for s in (plain, sn):
            s.set_fp()
            ref = s(x, t, c)
            s.set_config(s.uniform_config(4, 8))
            errs.append(float((s(x, t, c) - ref).pow(2).mean()))
    assert errs[1] <= errs[0] * 1.05


def test_text2image_search_export_load_sample_with_prompts(t2i_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration prompts\na red car\n\na blue sky\n")
    run, out = tmp_path / "run", tmp_path / "exp"
    args = ["search", "--model", str(t2i_dir), "--run-dir", str(run), "--prompts", str(prompts)]
    res = runner.invoke(app, [*args, "--guidance-scale", "3", *SEARCH])
    assert res.exit_code == 0, res.output
    calib = tmpq.CalibrationSet.load(run / "calib.safetensors")
    assert calib.cond_table.shape[0] == 2 and calib.config.conditioning
    assert json.loads((run / "search.json").read_text())["model_options"] == {
        "prompts": ["a red car", "a blue sky"],
        "guidance_scale": 3.0,
    }
    assert runner.invoke(app, ["export", "--run-dir", str(run), "--out", str(out)]).exit_code == 0
    back = tmpq.load(out)
    assert back.parts.kind == "text2image" and back.parts.prompts == ("a red car", "a blue sky")
    assert back.guidance_scale == 3.0 and _no_twins(back.parts.text_encoder.text_encoder)
    same = back.sample(2, seed=0, prompts=["a red car"])
    assert torch.equal(same, tmpq.CompressionResult.open(run).sampler().sample(2, seed=0, prompts=["a red car"]))
    other = back.sample(2, seed=0, prompts=["a blue sky"])
    assert same.shape == (2, 3, 16, 16) and (same - other).abs().mean() > 1e-3  # the prompt matters
    both = back.sample(2, seed=0, prompts=["a red car", "a blue sky"])  # sample i gets prompt i mod 2
    assert torch.equal(both[0], same[0]) and torch.equal(both[1], other[1])
    grid = tmp_path / "grid.png"
    res = runner.invoke(
        app, ["sample", "--compressed", str(out), "--num-samples", "2", "--prompt", "a cat", "--out", str(grid)]
    )
    assert res.exit_code == 0 and grid.is_file(), res.output


def test_other_prompts_recalibrate(t2i_dir, tmp_path):
    kw = dict(
        calib_config=CalibConfig(2, 2), spec=QuantSpec(w_bits=(8,), a_bits=(8,), reconstruction=None), progress=False
    )
    from tmpq.quant.prepare import prepare_supernet

    _, first, info = prepare_supernet(load_model(str(t2i_dir), prompts=["a"]), tmp_path, **kw)
    assert not info["reused"]
    _, again, info = prepare_supernet(load_model(str(t2i_dir), prompts=["a"]), tmp_path, **kw)
    assert info["reused"] and torch.equal(again.x[:], first.x[:])  # read from the file on demand
    _, other, info = prepare_supernet(load_model(str(t2i_dir), prompts=["b"]), tmp_path, **kw)
    assert not info["reused"] and other.config.conditioning != first.config.conditioning


def test_supernet_wraps_only_the_denoiser(t2i_dir):
    m = load_model(str(t2i_dir), prompts=["a"])
    sn = SuperNet.wrap(
        m.denoiser,
        QuantSpec(w_bits=(8,), a_bits=(8,), reconstruction=None),
        (torch.randn(1, 4, 8, 8), torch.tensor([3]), m.conditioning(1)),
    )
    assert sn.units and all(n.startswith("unet.") for n in sn.units)
    assert _no_twins(m.decoder.vae) and _no_twins(m.text_encoder.text_encoder)


def test_search_workers_rebuild_the_same_prompts(t2i_dir, tmp_path):
    """A worker process rebuilds the model from (spec, options): same prompts and guidance, same fitness."""
    from tmpq.search import Budget, EvolutionConfig, FitnessConfig, SearchConfig, run_search
    from tmpq.search.run import worker_fitness

    loaded = load_model(str(t2i_dir), prompts=["a red car", "a blue sky"], guidance_scale=2.0)
    cfg = SearchConfig(
        lever="joint",
        budget=Budget.like("W8A8", 3),
        steps=(3,),
        evolution=EvolutionConfig(
            population=4, parents=2, mutations=2, crossovers=1, randoms=1, generations=1, repair=False
        ),
        final_samples=0,
        fitness=FitnessConfig(kind="proxy", proxy_space="pixels", num_samples=4, reference_steps=6),
        calib=CalibConfig(2, 3),
        quant=QuantSpec(w_bits=(4, 8), a_bits=(8,), reconstruction=None),
        sensitivity_inputs=4,
    )
    res = run_search(loaded, cfg, tmp_path, progress=False)
    fitness = worker_fitness(str(t2i_dir), str(tmp_path), cfg, loaded.options)
    assert fitness.cond is not None and fitness.cond.digest() == loaded.conditioning(4).digest()
    assert fitness(res.best.candidate).value == res.best.value
