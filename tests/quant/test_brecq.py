"""Block reconstruction (BRECQ) per candidate width: better block outputs for weights and activations, still a switch,
saved with the super-network, resumable by block."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from interrupts import dies_after

from tmpq.errors import TmpqError
from tmpq.quant import QuantConfig, QuantSpec, SuperNet, brecq, build_supernet


def _spec(small_spec: QuantSpec, **kw) -> QuantSpec:
    return replace(small_spec, reconstruction="brecq", recon_iters=40, recon_batch=8, recon_rows=24, **kw)


@pytest.fixture(scope="module")
def pair(make_denoiser, calib, small_spec):
    """Range-only with nearest rounding (what reconstruction improves on), and BRECQ."""
    plain = build_supernet(make_denoiser(), calib, replace(small_spec, bias_correction=()), progress=False)
    learned = build_supernet(make_denoiser(), calib, _spec(small_spec), progress=False)
    return plain, learned


def _where_offered(sn: SuperNet, w: int | None, a: int | None) -> QuantConfig:
    """Every unit's weights at `w` and activations at `a` where it offers them, full precision elsewhere."""
    bits = {n: (w if w in u.w_candidates else None, a if a in u.a_candidates else None) for n, u in sn.units.items()}
    return QuantConfig.from_mapping(bits)


def _block_errors(sn: SuperNet, calib, w: int | None, a: int | None) -> float:
    """Summed output error of every block against FP, on FP block inputs, with every unit that offers `w` (weights)
    / `a` (activations) at it: what BRECQ targets."""
    idx = torch.arange(0, len(calib), 2)
    modules = dict(sn.model.named_modules())
    sn.set_fp()
    data = {b: brecq._capture(sn, modules[b], calib, idx, 16) for b in brecq.reconstruction_blocks(sn)}
    sn.set_config(_where_offered(sn, w, a))
    total = sum(brecq._block_error(modules[b], d) for b, d in data.items())
    sn.set_fp()
    return total


def test_blocks_are_the_unets_blocks_and_every_unit_is_in_one(pair):
    _, learned = pair
    blocks = brecq.reconstruction_blocks(learned)
    assert sorted(n for names in blocks.values() for n in names) == sorted(learned.units)
    kinds = {type(dict(learned.model.named_modules())[b]).__name__ for b in blocks}
    assert {"ResnetBlock2D", "Attention"} <= kinds
    attn = next(names for b, names in blocks.items() if b.endswith("attentions.0"))
    assert any(n.endswith("to_q") for n in attn) and any(n.endswith(".qk") for n in attn)  # projections + matmuls


def test_learned_rounding_and_steps_lower_the_block_error_at_every_width(pair, make_denoiser, calib, small_spec):
    plain, learned = pair
    corrected = build_supernet(make_denoiser(), calib, small_spec, progress=False)  # bias-corrected rounding
    for w in small_spec.w_bits:
        assert _block_errors(learned, calib, w, None) < _block_errors(plain, calib, w, None), f"W{w}"
        # never worse than its starting point, the bias-corrected codes (it keeps them where learning loses)
        assert _block_errors(learned, calib, w, None) <= _block_errors(corrected, calib, w, None), f"W{w}"
    for a in small_spec.a_bits:
        assert _block_errors(learned, calib, None, a) < _block_errors(plain, calib, None, a), f"A{a}"
    info = learned.calibration_info["reconstruction"]
    assert info["method"] == "brecq" and info["blocks"] > 0 and info["median_error_ratio"] >= 1.0
    assert info["act_iters"] == 10  # a quarter of the weight iterations, as the reference's 5,000 / 20,000


def test_codes_move_one_step_at_most_and_scales_stay_positive(pair, small_spec):
    plain, learned = pair
    moved_any = False
    for n, u in learned.units.items():
        for b in u.w_candidates:
            codes, ref = getattr(u, f"w{b}_codes"), getattr(plain.units[n], f"w{b}_codes")
            assert codes.dtype == torch.uint8 and int(codes.max()) < 2**b
            assert int((codes.int() - ref.int()).abs().max()) <= 1
            moved_any |= not torch.equal(codes, ref)
    assert moved_any
    quantizers = brecq._quantizers(learned, list(learned.units)).values()
    scales = [s for q in quantizers for k, s in q.qparams().items() if k.endswith("_scale")]
    assert scales and all(bool((s > 0).all()) for s in scales)


def test_a_width_learns_the_same_parameters_whatever_the_other_candidates(pair, make_denoiser, calib, small_spec):
    """Any mix stays valid: a block's W6 codes and A8 steps do not depend on which other widths were calibrated, and a
    switch to a config equals the super-network built for that config alone, bit for bit."""
    _, learned = pair
    only = build_supernet(make_denoiser(), calib, _spec(small_spec, w_bits=(6,), a_bits=(8,)), progress=False)
    for n, u in only.units.items():
        for k, v in u.qparams().items():
            if k.startswith(("w6_", "act.a8_", "left.a8_", "right.a8_")):
                assert torch.equal(v, learned.units[n].qparams()[k]), (n, k)
    x, t = calib.x[:4], calib.t[:4]
    cfg = only.uniform_config(6, 8)
    outs = []
    for sn in (learned, only):
        sn.set_config(cfg)
        with torch.no_grad():
            outs.append(sn(x, t))
    assert torch.equal(*outs)


def test_saved_super_network_keeps_the_learned_parameters(pair, make_denoiser, tmp_path):
    _, learned = pair
    learned.save(tmp_path / "sn")
    back = SuperNet.load(tmp_path / "sn", make_denoiser())
    for n, u in learned.units.items():
        for k, v in u.qparams().items():
            assert torch.equal(v, back.units[n].qparams()[k]), (n, k)


def test_killed_reconstruction_resumes_by_block_to_the_same_result(
    pair, make_denoiser, calib, small_spec, tmp_path, monkeypatch
):
    _, learned = pair
    real = brecq.learn_block_weights
    monkeypatch.setattr(brecq, "learn_block_weights", dies_after(real, 6))
    with pytest.raises(KeyboardInterrupt):
        build_supernet(make_denoiser(), calib, _spec(small_spec), progress=False, progress_dir=tmp_path)
    kept = list(tmp_path.glob("*.safetensors"))
    assert 0 < len(kept) < len(brecq.reconstruction_blocks(learned))
    monkeypatch.setattr(brecq, "learn_block_weights", real)
    resumed = build_supernet(make_denoiser(), calib, _spec(small_spec), progress=False, progress_dir=tmp_path)
    for n, u in resumed.units.items():
        for k, v in u.qparams().items():
            assert torch.equal(v, learned.units[n].qparams()[k]), (n, k)


def test_brecq_is_a_reconstruction_with_presets():
    spec = QuantSpec().with_reconstruction("brecq", "paper")
    assert spec.reconstruction == "brecq" and spec.recon_iters == 20_000
    assert QuantSpec.from_dict(spec.to_dict()) == spec


def test_learned_parameters_travel_through_export_load_and_the_backends(pair, tmp_path):
    """Learned codes and steps are just other codes and scales: an export loads back to the same samples, the
    packed backend equals the super-network bit for bit, and every int8 layer equals its fake-quantized twin."""
    import random

    import tmpq
    from tmpq.compressed import CompressedSampler
    from tmpq.runtime import Backend
    from tmpq.runtime.lowering import lower
    from tmpq.sampling.schedules import NoiseSchedule
    from tmpq.search import SearchSpace

    _, learned = pair
    space = SearchSpace.from_supernet(learned, steps=(3,))
    cand = space.random(random.Random(5))
    s = CompressedSampler.from_candidate(learned, space, cand, NoiseSchedule(), (1, 32, 32))
    ref = s.sample(3, seed=1)
    assert torch.equal(tmpq.load(s.export(tmp_path / "export")).sample(3, seed=1), ref)
    assert torch.equal(lower(s, "packed").sample(3, seed=1), ref)
    rs = lower(s, Backend("int8", exact_rounding=True))
    gen = torch.Generator().manual_seed(0)
    for name, layer in rs.denoiser.layers.items():
        twin = learned.units[name]
        c = twin.base.weight.shape[1]
        for key in layer.variants:
            x = torch.randn(2, c, 8, 8, generator=gen) if layer.kind == "conv" else torch.randn(2, 3, c, generator=gen)
            twin.set_bits(*key)
            layer.active = key
            with torch.no_grad():
                a, b = twin(x), layer(x)
            assert (a - b).abs().max() <= 1e-5 * a.abs().max() + 1e-6, (name, key)
    learned.set_fp()


@pytest.fixture(scope="module")
def upstream(make_denoiser, calib, small_spec):
    """BRECQ on quantized inputs (every earlier block at the width being learned), beside `pair`'s FP-input one."""
    return build_supernet(make_denoiser(), calib, _spec(small_spec, recon_inputs="quantized"), progress=False)


def test_quantized_inputs_walk_the_blocks_in_the_order_the_model_runs_them(upstream, calib):
    blocks = list(brecq.reconstruction_blocks(upstream))
    order = brecq.execution_order(upstream, calib, blocks)
    assert sorted(order) == sorted(blocks)
    pos = {b: i for i, b in enumerate(order)}
    assert pos["unet.conv_in"] < pos["unet.down_blocks.0.resnets.0"] < pos["unet.mid_block.resnets.0"]
    assert pos["unet.mid_block.resnets.1"] < pos["unet.up_blocks.0.resnets.0"] and order[-1] == "unet.conv_out"
    assert pos["unet.time_embedding.linear_2"] < pos["unet.down_blocks.0.resnets.0"]  # the ResNets read its output
    assert upstream.calibration_info["reconstruction"]["inputs"] == "quantized"


def test_quantized_inputs_change_only_what_has_quantized_blocks_upstream(pair, upstream, calib):
    """The first block the model runs sees the same FP input either way, so it learns the same codes; a block that
    runs after quantized ones learns others."""
    _, learned = pair
    _assert_first_block_alike_later_one_not(upstream, learned, calib)


def _assert_first_block_alike_later_one_not(sn: SuperNet, other: SuperNet, calib) -> None:
    """`sn` and `other` learned the same W4 codes for the first block the model runs (which sees the FP inputs
    under every choice of inputs) and other codes somewhere in a block that runs after quantized ones."""
    blocks = brecq.reconstruction_blocks(sn)
    first, *_ = brecq.execution_order(sn, calib, list(blocks))
    for n in blocks[first]:
        assert torch.equal(sn.units[n].w4_codes, other.units[n].w4_codes), n
    later = blocks["unet.up_blocks.0.resnets.0"]
    assert any(not torch.equal(sn.units[n].w4_codes, other.units[n].w4_codes) for n in later)


def test_quantized_inputs_lower_the_whole_models_error_at_uniform_widths(pair, upstream, calib):
    """What asymmetric reconstruction is for: each block also undoes the error that reaches it, so the model's
    output at a uniform width is closer to FP's than when every block learned from FP inputs."""
    _, learned = pair
    with torch.no_grad():
        upstream.set_fp()
        ref = upstream(calib.x, calib.t)

        def error(sn, w, a) -> float:
            sn.set_config(_where_offered(sn, w, a))
            out = sn(calib.x, calib.t)
            sn.set_fp()
            return float((out - ref).pow(2).mean() / ref.pow(2).mean())

        for w, a in ((4, None), (4, 8), (6, 6)):
            assert error(upstream, w, a) < error(learned, w, a), (w, a)


def test_quantized_inputs_keep_the_super_network_a_switch_and_resume_by_block(
    upstream, make_denoiser, calib, small_spec, tmp_path, monkeypatch
):
    """A width's parameters do not depend on the other candidates (earlier blocks are at that width only), and a
    killed run resumes to the uninterrupted result although every block's inputs depend on the blocks before it."""
    spec = _spec(small_spec, w_bits=(4,), a_bits=(8,), recon_inputs="quantized")
    real = brecq.learn_block_weights
    monkeypatch.setattr(brecq, "learn_block_weights", dies_after(real, 5))
    with pytest.raises(KeyboardInterrupt):
        build_supernet(make_denoiser(), calib, spec, progress=False, progress_dir=tmp_path)
    assert 0 < len(list(tmp_path.glob("*.safetensors"))) < len(brecq.reconstruction_blocks(upstream))
    monkeypatch.setattr(brecq, "learn_block_weights", real)
    resumed = build_supernet(make_denoiser(), calib, spec, progress=False, progress_dir=tmp_path)
    for n, u in resumed.units.items():  # the narrowed, resumed run equals the wide, uninterrupted one at W4 / A8
        for k, v in u.qparams().items():
            if k.startswith(("w4_", "act.a8_", "left.a8_", "right.a8_")):
                assert torch.equal(v, upstream.units[n].qparams()[k]), (n, k)


def test_recon_inputs_is_validated_and_old_specs_read_as_fp_inputs():
    with pytest.raises(TmpqError, match="recon_inputs must be one of"):
        QuantSpec(recon_inputs="upstream")
    with pytest.raises(TmpqError, match="needs reconstruction='brecq'"):
        QuantSpec(reconstruction="adaround", recon_inputs="quantized")
    spec = QuantSpec(recon_inputs="quantized")
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if k != "recon_inputs"}  # saved before the field existed
    assert QuantSpec.from_dict(old).recon_inputs == "fp"


def test_mixed_inputs_take_each_element_from_either_model_at_even_odds():
    """QDrop's input mixing: a learning batch draws every element from the quantized or the FP inputs, again for
    each batch, from the (block, width)'s own generator; the final error reads the quantized inputs alone."""
    rows = 64
    fp = brecq._BlockData([torch.ones(rows, 4, 8, 8)], {"temb": torch.ones(rows, 16), "scale": 1.0}, torch.zeros(rows))
    data = brecq._BlockData([torch.zeros(rows, 4, 8, 8)], {"temb": torch.zeros(rows, 16), "scale": 1.0}, fp.out, fp)
    idx = torch.arange(0, rows, 2)
    args, kwargs, out = data.batch(idx, torch.Generator().manual_seed(1))
    x = args[0]
    assert set(x.unique().tolist()) == {0.0, 1.0} and abs(float(x.mean()) - brecq.MIX_QUANTIZED_SHARE) < 0.03
    assert set(kwargs["temb"].unique().tolist()) == {0.0, 1.0} and kwargs["scale"] == 1.0 and out.shape == (32,)
    again, _, _ = data.batch(idx, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], x)  # deterministic under the generator: resume by block stays exact
    gen = torch.Generator().manual_seed(1)
    first, second = data.batch(idx, gen)[0][0], data.batch(idx, gen)[0][0]
    assert not torch.equal(first, second)  # redrawn each batch
    assert torch.equal(data.batch(idx)[0][0], torch.zeros(32, 4, 8, 8))  # no generator: the quantized inputs


def test_mixed_inputs_learn_between_fp_and_quantized_inputs_and_resume_by_block(
    pair, upstream, make_denoiser, calib, small_spec, tmp_path, monkeypatch
):
    """The first block sees the FP inputs under every choice, so it learns the same codes; later blocks learn
    codes of their own; a killed mixed-input run resumes to the uninterrupted one bit for bit."""
    spec = _spec(small_spec, w_bits=(4,), a_bits=(8,), recon_inputs="mixed")
    mixed = build_supernet(make_denoiser(), calib, spec, progress=False)
    assert mixed.calibration_info["reconstruction"]["inputs"] == "mixed"
    _, learned = pair
    for other in (learned, upstream):
        _assert_first_block_alike_later_one_not(mixed, other, calib)
    real = brecq.learn_block_weights
    monkeypatch.setattr(brecq, "learn_block_weights", dies_after(real, 5))
    with pytest.raises(KeyboardInterrupt):
        build_supernet(make_denoiser(), calib, spec, progress=False, progress_dir=tmp_path)
    monkeypatch.setattr(brecq, "learn_block_weights", real)
    resumed = build_supernet(make_denoiser(), calib, spec, progress=False, progress_dir=tmp_path)
    for n, u in resumed.units.items():
        for k, v in u.qparams().items():
            assert torch.equal(v, mixed.units[n].qparams()[k]), (n, k)
