"""One check the transformer tests share: a quantized attention stand-in at full precision computes what diffusers'
processor does, and every unit's MACs (attention matmuls included) sum to what FlopCounterMode counts."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from tmpq.quant import CalibConfig, QuantSpec, build_supernet, collect_calibration


def check_fp_output_and_macs(m) -> list[str]:
    """For a text-conditioned LoadedModel: builds a small super-network, checks FP equality (1e-5), the MAC count
    and that 8-bit quantization changes the output; returns the unit names."""
    cond = m.conditioning(2)
    calib = collect_calibration(
        m.denoiser, m.schedule, m.sample_shape, CalibConfig(2, 3, conditioning=cond.digest()), progress=False, cond=cond
    )
    x, t, c = calib.rows(slice(0, 2))
    with torch.no_grad():
        ref = m.denoiser(x, t, c)
    sn = build_supernet(m.denoiser, calib, QuantSpec(w_bits=(4, 8), a_bits=(8,), reconstruction=None), progress=False)
    sn.set_fp()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        out = sn(x[:1], t[:1], c.select(0, 1))
    assert sn.cost.macs == fc.get_total_flops() // 2
    with torch.no_grad():
        assert torch.allclose(sn(x, t, c), ref, atol=1e-5)
        sn.set_config(sn.uniform_config(8, 8))
        assert not torch.allclose(sn(x, t, c), ref, atol=1e-5) and out.shape == ref[:1].shape
    return list(sn.units)
