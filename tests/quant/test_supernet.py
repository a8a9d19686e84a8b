from __future__ import annotations

import random

import pytest
import torch

from tmpq.errors import TmpqError
from tmpq.quant import QuantConfig, QuantSpec, SuperNet, build_supernet, model_fingerprint, quantize_
from tmpq.quant.layers import MatmulQuant
from tmpq.quant.primitives import sqnr_db


@pytest.fixture(scope="module")
def fp_model(make_denoiser):
    return make_denoiser()


@pytest.fixture(scope="module")
def supernet(make_denoiser, calib, small_spec) -> SuperNet:
    return build_supernet(make_denoiser(), calib, small_spec, progress=False)


@torch.no_grad()
def _out(model, probe):
    return model(*probe)


def _random_config(sn: SuperNet, seed: int) -> QuantConfig:
    rng = random.Random(seed)
    bits = {}
    for name, u in sn.units.items():
        w = None if isinstance(u, MatmulQuant) else rng.choice(u.w_candidates or (None,))
        bits[name] = (w, rng.choice(u.a_candidates or (None,)))
    return QuantConfig.from_mapping(bits)


def test_switch_equals_freshly_quantized_model(supernet, make_denoiser, calib, small_spec, probe):
    for seed in (0, 1):
        c = _random_config(supernet, seed)
        supernet.set_config(c)
        fresh = quantize_(make_denoiser(), c, calib, small_spec)
        assert torch.equal(_out(supernet, probe), _out(fresh, probe))


def test_switching_has_no_memory(supernet, probe):
    c1, c2 = _random_config(supernet, 3), _random_config(supernet, 4)
    supernet.set_config(c1)
    first = _out(supernet, probe)
    supernet.set_config(c2)
    assert not torch.equal(_out(supernet, probe), first)
    supernet.set_config(c1)
    assert torch.equal(_out(supernet, probe), first)
    assert supernet.config == c1


def test_full_precision_mode_matches_original(supernet, fp_model, probe):
    supernet.set_fp()
    torch.testing.assert_close(_out(supernet, probe), _out(fp_model, probe), atol=1e-5, rtol=1e-5)


def test_w8a8_close_to_fp_and_error_falls_with_bits(supernet, fp_model, probe):
    ref = _out(fp_model, probe)
    sq = {}
    for w, a in [(4, 6), (6, 6), (8, 8)]:
        supernet.set_config(supernet.uniform_config(w, a))
        sq[(w, a)] = sqnr_db(ref, _out(supernet, probe))
    assert sq[(4, 6)] < sq[(6, 6)] < sq[(8, 8)], sq
    # bound: W8A8 output within 20 dB SQNR (relative L2 error < 10 %) of FP on this random tiny UNet
    assert sq[(8, 8)] > 20, sq


def test_per_layer_weight_sqnr_rises_with_bits(supernet):
    for name, u in supernet.units.items():
        if isinstance(u, MatmulQuant) or len(u.w_candidates) < 2:
            continue
        sq = [sqnr_db(u.base.weight, u.dequantized_weight(b)) for b in u.w_candidates]
        assert all(b > a for a, b in zip(sq, sq[1:])), (name, sq)


def test_memory_bounded_codes_not_float_copies(supernet, fp_model):
    for u in supernet.units.values():
        for b in getattr(u, "w_candidates", ()):
            assert getattr(u, f"w{b}_codes").dtype == torch.uint8
    # the FP weights are the model's own tensors, unchanged: no copy, nothing overwritten
    assert model_fingerprint(fp_model) == supernet.fingerprint
    n_params = sum(p.numel() for p in supernet.parameters())
    assert n_params == sum(p.numel() for p in fp_model.parameters())


def test_pins_and_matmuls(supernet):
    assert supernet.pinned == {"unet.conv_in": (8, None), "unet.conv_out": (8, 8)}
    assert supernet.units["unet.conv_in"].a_candidates == ()  # the raw x_t input stays FP by default
    assert supernet.units["unet.conv_in"].w_candidates == (8,)
    c = supernet.uniform_config(4, 6)
    assert c["unet.conv_in"] == (8, None) and c["unet.down_blocks.0.resnets.0.conv1"] == (4, 6)
    qk = next(n for n in supernet.units if n.endswith(".qk"))
    assert c[qk] == (None, 6)


def test_skip_concat_split_points(supernet):
    # tiny UNet (8, 16) channels: up block 0 gets 16 channels from the mid block + 16 skip; its second resnet
    # gets its first resnet's 16 outputs + 16 skip; up block 1 gets 16 + 8, then 8 + 8.
    assert supernet.splits() == {
        "unet.up_blocks.0.resnets.0.conv1": 16,
        "unet.up_blocks.0.resnets.0.conv_shortcut": 16,
        "unet.up_blocks.0.resnets.1.conv1": 16,
        "unet.up_blocks.0.resnets.1.conv_shortcut": 16,
        "unet.up_blocks.1.resnets.0.conv1": 16,
        "unet.up_blocks.1.resnets.0.conv_shortcut": 16,
        "unet.up_blocks.1.resnets.1.conv1": 8,
        "unet.up_blocks.1.resnets.1.conv_shortcut": 8,
    }
    u = supernet.units["unet.up_blocks.1.resnets.0.conv_shortcut"]
    assert u.act.a8_scale.shape == (2,) and u.act.a8_scale[0] != u.act.a8_scale[1]


def test_include_exclude(make_denoiser, calib):
    spec = QuantSpec(w_bits=(8,), a_bits=(8,), exclude=("*attentions*", "*time_emb*"), reconstruction=None)
    sn = build_supernet(make_denoiser(), calib, spec, progress=False)
    assert sn.units and not any("attentions" in n or "time_emb" in n for n in sn.units)


def test_calibration_deterministic(supernet, make_denoiser, calib, small_spec):
    again = build_supernet(make_denoiser(), calib, small_spec, progress=False)
    for name, u in supernet.units.items():
        a, b = u.qparams(), again.units[name].qparams()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_save_load_round_trip(supernet, make_denoiser, probe, tmp_path):
    supernet.save(tmp_path / "sn")
    loaded = SuperNet.load(tmp_path / "sn", make_denoiser())
    assert loaded.cost == supernet.cost and loaded.splits() == supernet.splits()
    for seed in (5, 6):
        c = _random_config(supernet, seed)
        supernet.set_config(c)
        loaded.set_config(c)
        assert torch.equal(_out(loaded, probe), _out(supernet, probe))


def test_load_rejects_other_weights_and_damaged_files(supernet, make_denoiser, tmp_path):
    d = supernet.save(tmp_path / "sn")
    with pytest.raises(TmpqError, match="different model weights"):
        SuperNet.load(d, make_denoiser(seed=1))
    with pytest.raises(TmpqError, match="no saved super-network"):
        SuperNet.load(tmp_path / "nothing", make_denoiser())
    t = d / "supernet.safetensors"
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    with pytest.raises(TmpqError, match="unreadable"):
        SuperNet.load(d, make_denoiser())


def test_bad_configs_get_clear_errors(supernet, make_denoiser, calib, small_spec):
    good = supernet.uniform_config(8, 8).as_dict()
    name = "unet.down_blocks.0.resnets.0.conv1"
    qk = next(n for n in supernet.units if n.endswith(".qk"))
    cases = {
        "does not have": {**good, "unet.nope": (8, 8)},
        "no bits": {k: v for k, v in good.items() if k != name},
        "not a calibrated candidate": {**good, name: (3, 8)},
        "weight bits must be None": {**good, qk: (8, 8)},
    }
    for match, bits in cases.items():
        with pytest.raises(TmpqError, match=match):
            supernet.set_config(QuantConfig.from_mapping(bits))
    with pytest.raises(TmpqError, match="not a calibrated candidate"):
        supernet.uniform_config(5, 8)
    raw = SuperNet.wrap(make_denoiser(), small_spec, (calib.x[:1], calib.t[:1]))
    with pytest.raises(TmpqError, match="not calibrated"):
        raw.set_config(supernet.uniform_config(8, 8))
    with pytest.raises(TmpqError, match="no quantizable layers"):
        SuperNet.wrap(make_denoiser(), QuantSpec(include=("nothing*",)), (calib.x[:1], calib.t[:1]))


def test_unwrap_and_failed_load_leave_the_model_as_it_was(make_denoiser, calib, small_spec, probe, tmp_path):
    from safetensors.torch import load_file, save_file

    from tmpq.quant.layers import QuantUnit

    plain = make_denoiser()
    ref = _out(plain, probe)
    sn = build_supernet(make_denoiser(), calib, small_spec, progress=False)
    d = sn.save(tmp_path / "sn")
    model = sn.unwrap()
    assert not any(isinstance(m, QuantUnit) for m in model.modules())
    assert torch.equal(_out(model, probe), ref) and model_fingerprint(model) == model_fingerprint(plain)
    tensors = load_file(str(d / "supernet.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".w4_" not in k}, str(d / "supernet.safetensors"))
    victim = make_denoiser()
    with pytest.raises(TmpqError, match="incomplete"):
        SuperNet.load(d, victim)
    assert not any(isinstance(m, QuantUnit) for m in victim.modules())
    assert torch.equal(_out(victim, probe), ref)


def test_wrapping_a_wrapped_model_is_refused_until_unwrapped(make_denoiser, calib, small_spec):
    model = make_denoiser()
    sn = build_supernet(model, calib, small_spec, progress=False)
    with pytest.raises(TmpqError, match="already carries a tmpq super-network"):
        build_supernet(model, calib, small_spec, progress=False)
    names = set(sn.units)
    again = build_supernet(sn.unwrap(), calib, small_spec, progress=False)
    assert set(again.units) == names


def test_quantize_with_a_uniform_config_needs_no_layer_names(supernet, make_denoiser, calib, small_spec, probe):
    """quantize_(model, QuantConfig.uniform(6, 6), calib) works on a bare model and equals the super-network
    switched to the same setting (pins kept, matmuls at the activation width); named layers override."""
    fresh = quantize_(make_denoiser(), QuantConfig.uniform(6, 6), calib, small_spec)
    supernet.set_config(supernet.uniform_config(6, 6))
    assert fresh.config == supernet.config
    assert torch.equal(_out(fresh, probe), _out(supernet, probe))
    name = next(
        n for n in supernet.units if n not in supernet.pinned and not isinstance(supernet.units[n], MatmulQuant)
    )
    supernet.set_config(QuantConfig.uniform(6, 6, **{name: (8, 8)}))
    assert supernet.config[name] == (8, 8) and sum(wa == (6, 6) for wa in supernet.config.as_dict().values()) > 1
    with pytest.raises(TmpqError, match="not calibrated|candidate"):
        supernet.set_config(QuantConfig.uniform(5, 6))
