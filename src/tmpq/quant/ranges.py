"""Range calibration of a wrapped model: per-channel MSE clipping of every weight at every candidate width, and one
FP pass over the calibration set feeding every activation quantizer's observer, then each candidate's range by MSE.
The same pass measures each layer's mean input, on which the weight codes are bias-corrected (quant/bias_correction.py,
`QuantSpec.bias_correction`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from tmpq.device import module_device
from tmpq.quant.bias_correction import balance_codes, input_mean_shape_ok, sum_input
from tmpq.quant.calibration import CalibrationSet
from tmpq.sampling.conditioning import call_denoiser

if TYPE_CHECKING:
    from tmpq.quant.supernet import SuperNet


@torch.no_grad()
def calibrate_ranges(sn: SuperNet, calib: CalibrationSet, batch_size: int = 64, progress: bool = True) -> dict:
    """Weights: MSE clipping per channel and candidate. Activations: one FP pass over the calibration
    set feeds every quantizer's observer, then each candidate's range is chosen by MSE."""
    t0 = time.perf_counter()
    weight_units = [u for u in sn.units.values() if hasattr(u, "calibrate_weights")]
    for u in tqdm(weight_units, desc="calibrate weights", disable=not progress, leave=False):
        u.calibrate_weights()
    t1 = time.perf_counter()
    sn.set_fp()
    quantizers = [q for q in sn.quantizers() if q.candidates]  # a pinned-FP input needs no ranges
    for q in quantizers:
        q.start_observing(sn.spec.act_max_values)
    corrected = [u for u in weight_units if sn.spec.corrects(u.name) and _correctable(u)]
    sums: dict[str, list] = {u.name: [0.0, 0.0, 0] for u in corrected}

    def add_input(unit, args) -> None:
        for i, v in enumerate(sum_input(unit.base, args[0])):
            sums[unit.name][i] += v

    hooks = [u.register_forward_pre_hook(add_input) for u in corrected]
    try:
        bar = tqdm(total=len(calib), desc="calibrate activations", disable=not progress, leave=False)
        for x, t, cond in calib.batches(batch_size, module_device(sn.model)):
            call_denoiser(sn.model, x, t, cond)
            bar.update(len(x))
        bar.close()
        for q in tqdm(quantizers, desc="activation ranges", disable=not progress, leave=False):
            q.finish_observing(sn.spec.act_method)
    finally:
        for h in hooks:
            h.remove()
        for q in quantizers:
            q.observers = None
    t2 = time.perf_counter()
    for u in corrected:
        total, squares, n = sums[u.name]
        if n:
            _correct_codes(u, total / n, squares / n)
    sn.calibrated = True
    sn.calibration_info = {
        "calib_config": {**calib.config.__dict__},
        "calib_rows": len(calib),
        "weights_s": round(t1 - t0, 3),
        "activations_s": round(t2 - t1, 3),
    }
    if sn.spec.bias_correction:
        sn.calibration_info["bias_correction"] = {
            "layers": len(corrected),
            "patterns": list(sn.spec.bias_correction),
            "s": round(time.perf_counter() - t2, 3),
        }
    return sn.calibration_info


def _correctable(unit) -> bool:
    return input_mean_shape_ok(unit.base) and any(unit.weight_format(b) == "int" for b in unit.w_candidates)


def _correct_codes(unit, mean: torch.Tensor, second: torch.Tensor) -> None:
    """Every integer width's codes of `unit`, re-rounded where that lowers the expected output error (the offset on
    the mean input against the per-weight error on the input's variance)."""
    for b in unit.w_candidates:
        if unit.weight_format(b) != "int":
            continue  # e4m3 codes are not a rounding of one affine grid
        codes, scale, zp = unit.weight_codes(b)
        fixed = balance_codes(unit.base.weight, codes, scale, zp, b, mean, second)
        unit.register_buffer(f"w{b}_codes", fixed, persistent=False)
