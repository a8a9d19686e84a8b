from __future__ import annotations

import torch

from tmpq.quant.observers import ActObserver, act_qparams, weight_qparams
from tmpq.quant.primitives import affine_qparams, channel_view, fake_quantize, sqnr_db


def _wq(w, bits):
    s, z = weight_qparams(w, bits)
    return fake_quantize(w, channel_view(s, w.ndim), channel_view(z, w.ndim), bits)


def test_weight_sqnr_rises_with_bits():
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    sq = [sqnr_db(w, _wq(w, b)) for b in (2, 3, 4, 5, 6, 8)]
    assert all(b > a for a, b in zip(sq, sq[1:])), sq
    assert sq[-1] > 40  # 8-bit per-channel on Gaussian weights: ~ 6 dB per bit


def test_mse_clipping_beats_min_max_at_low_bits():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    w[:, 0] *= 8  # one outlier per channel: min-max would waste the codes on it
    for bits in (2, 3, 4):
        lo, hi = w.min(1).values, w.max(1).values
        s, z = affine_qparams(lo, hi, bits)
        minmax = fake_quantize(w, s[:, None], z[:, None], bits)
        assert (_wq(w, bits) - w).pow(2).mean() < (minmax - w).pow(2).mean()


def test_per_channel_ranges_are_independent():
    w = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    w[2] *= 100
    s, _ = weight_qparams(w, 8)
    assert s[2] > 20 * s[0]
    assert sqnr_db(w[0], _wq(w, 8)[0]) > 35  # a huge neighbour channel does not hurt channel 0


def _observed(name="layer", seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = ActObserver(name, max_values=4096, per_batch=1024)
    for _ in range(8):
        x = torch.randn(16, 8, 4, 4, generator=g)
        x[0, 0, 0, 0] = 40.0  # a rare outlier
        obs.update(x)
    return obs


def test_act_observer_deterministic_and_bounded():
    a, b = _observed(), _observed()
    assert torch.equal(a.values(), b.values())
    assert a.values().numel() == 4096 and a.max == 40.0
    assert act_qparams(a, 6) == act_qparams(b, 6)


def test_act_mse_range_beats_min_max_on_outliers():
    obs = _observed()
    vals = obs.values()
    for bits in (4, 6):
        errs = {}
        for method in ("mse", "minmax"):
            s, z = act_qparams(obs, bits, method)
            errs[method] = float((fake_quantize(vals, torch.tensor(s), torch.tensor(z), bits) - vals).pow(2).mean())
        assert errs["mse"] < errs["minmax"]
