"""Learned rounding (AdaRound) per candidate weight width: better outputs, still a switch, resumable, checked."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from interrupts import dies_after

from tmpq.errors import TmpqError
from tmpq.quant import QuantSpec, build_supernet
from tmpq.quant import reconstruction as recon
from tmpq.quant.primitives import channel_view, dequantize


def _spec(small_spec: QuantSpec, **kw) -> QuantSpec:
    return replace(small_spec, reconstruction="adaround", recon_iters=40, recon_batch=8, recon_rows=24, **kw)


def _unit_error(sn, calib, bits: int) -> float:
    """Summed output error of every weight unit at `bits`, on FP inputs (what reconstruction targets)."""
    idx = recon.recon_rows(len(calib), 24)
    units = {n: u for n, u in sn.units.items() if hasattr(u, "apply_weight") and bits in u.w_candidates}
    sn.set_fp()
    cap = recon._Capture(units, len(idx))
    with torch.no_grad():
        sn(*calib.rows(idx)[:2])
    cap.close()
    total = 0.0
    for n, u in units.items():
        w = u.base.weight.detach()
        wq = dequantize(
            getattr(u, f"w{bits}_codes"),
            channel_view(getattr(u, f"w{bits}_scale"), w.ndim),
            channel_view(getattr(u, f"w{bits}_zp"), w.ndim),
        )
        with torch.no_grad():
            total += float(recon._output_error(u, cap.store[n], wq, w))
    return total


@pytest.fixture(scope="module")
def pair(make_denoiser, calib, small_spec):
    """Range-only with nearest rounding (what learned rounding improves on), and AdaRound."""
    plain = build_supernet(make_denoiser(), calib, replace(small_spec, bias_correction=()), progress=False)
    learned = build_supernet(make_denoiser(), calib, _spec(small_spec), progress=False)
    return plain, learned


def test_learned_rounding_lowers_the_output_error_at_every_width(pair, calib, small_spec):
    plain, learned = pair
    for b in small_spec.w_bits:
        assert _unit_error(learned, calib, b) < _unit_error(plain, calib, b), b
    info = learned.calibration_info["reconstruction"]
    assert info["method"] == "adaround" and info["units"] > 0 and info["median_error_ratio"] >= 1.0


def test_learned_codes_lower_the_model_error_at_low_width(pair, probe, small_spec):
    """The whole denoiser at uniform W4 (activations FP) is closer to FP with learned rounding."""
    plain, learned = pair
    x, t = probe
    errs = []
    for sn in (plain, learned):
        sn.set_fp()
        with torch.no_grad():
            ref = sn(x, t)
            cfg = sn.uniform_config(4, 8)
            sn.set_config(cfg.__class__.from_mapping({n: (w, None) for n, (w, _) in cfg.as_dict().items()}))
            errs.append(float((sn(x, t) - ref).pow(2).mean()))
    assert errs[1] < errs[0]


def test_ranges_are_unchanged_and_codes_stay_in_range(pair, small_spec):
    plain, learned = pair
    for n, u in learned.units.items():
        for b in getattr(u, "w_candidates", ()):
            p = plain.units[n]
            assert torch.equal(getattr(u, f"w{b}_scale"), getattr(p, f"w{b}_scale"))
            codes = getattr(u, f"w{b}_codes")
            assert codes.dtype == torch.uint8 and int(codes.max()) < 2**b
            moved = (codes.int() - getattr(p, f"w{b}_codes").int()).abs()
            assert int(moved.max()) <= 1  # learned rounding moves a code by at most one step


def test_a_width_learns_the_same_codes_whatever_the_other_candidates(pair, make_denoiser, calib, small_spec):
    """Any mix stays valid: a unit's codes at W6 do not depend on which other widths were calibrated."""
    _, learned = pair
    only6 = build_supernet(make_denoiser(), calib, _spec(small_spec, w_bits=(6,)), progress=False)
    for n, u in only6.units.items():
        if 6 in getattr(u, "w_candidates", ()):
            assert torch.equal(u.w6_codes, learned.units[n].w6_codes), n


def test_killed_reconstruction_resumes_by_unit_to_the_same_codes(
    pair, make_denoiser, calib, small_spec, tmp_path, monkeypatch
):
    _, learned = pair
    real = recon.adaround_codes
    monkeypatch.setattr(recon, "adaround_codes", dies_after(real, 5))
    with pytest.raises(KeyboardInterrupt):
        build_supernet(make_denoiser(), calib, _spec(small_spec), progress=False, progress_dir=tmp_path)
    kept = list(tmp_path.glob("*.safetensors"))
    assert 0 < len(kept) < len(learned.units)
    monkeypatch.setattr(recon, "adaround_codes", real)
    resumed = build_supernet(make_denoiser(), calib, _spec(small_spec), progress=False, progress_dir=tmp_path)
    for n, u in resumed.units.items():
        for b in getattr(u, "w_candidates", ()):
            assert torch.equal(getattr(u, f"w{b}_codes"), getattr(learned.units[n], f"w{b}_codes")), (n, b)


@pytest.mark.parametrize(
    "bad", [{"reconstruction": "brecq2"}, {"recon_iters": 0}, {"recon_batch": 0}, {"recon_rows": -1}]
)
def test_bad_reconstruction_options_are_refused(bad):
    with pytest.raises(TmpqError):
        QuantSpec(**bad)
    with pytest.raises(TmpqError, match="preset"):
        QuantSpec().with_reconstruction("adaround", "fast")
