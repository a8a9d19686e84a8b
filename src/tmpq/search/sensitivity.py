"""Per-gene sensitivity: how much the denoiser's output moves when one layer's weights (or input
activations) alone are quantized to each candidate width. Repair spends bits where this is high."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tmpq.device import module_device
from tmpq.quant.calibration import CalibrationSet
from tmpq.quant.layers import MatmulQuant
from tmpq.quant.supernet import SuperNet


@torch.no_grad()
def layer_sensitivity(
    supernet: SuperNet, calib: CalibrationSet, num_inputs: int = 32, progress: bool = True
) -> dict[str, dict[str, dict[int, float]]]:
    """unit -> {"w": {bits: mse}, "a": {bits: mse}}: output MSE vs FP, on inputs spread over all timesteps.

    Costs Σ_units (|W| + |A|) forwards of `num_inputs` inputs; measured once per super-network.
    """
    idx = torch.linspace(0, len(calib) - 1, min(num_inputs, len(calib))).round().long()
    # calibration rows are ordered trajectory by trajectory; a strided pick covers every timestep
    x, t, c = calib.rows(idx, module_device(supernet))
    supernet.set_fp()
    ref = supernet(x, t, c)
    out: dict[str, dict[str, dict[int, float]]] = {}
    for name, unit in tqdm(supernet.units.items(), desc="layer sensitivity", disable=not progress, leave=False):
        entry: dict[str, dict[int, float]] = {"w": {}, "a": {}}
        if not isinstance(unit, MatmulQuant):
            for w in unit.w_candidates:
                unit.set_bits(w, None)
                entry["w"][w] = float((supernet(x, t, c) - ref).pow(2).mean())
        for a in unit.a_candidates:
            unit.set_bits(None, a)
            entry["a"][a] = float((supernet(x, t, c) - ref).pow(2).mean())
        unit.set_bits(None, None)
        out[name] = entry
    return out
