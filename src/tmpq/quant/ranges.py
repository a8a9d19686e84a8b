"""Range calibration of a wrapped model: per-channel MSE clipping of every weight at every candidate width, and one
FP pass over the calibration set feeding every activation quantizer's observer, then each candidate's range by MSE."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from tmpq.device import module_device
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
    try:
        bar = tqdm(total=len(calib), desc="calibrate activations", disable=not progress, leave=False)
        for x, t, cond in calib.batches(batch_size, module_device(sn.model)):
            call_denoiser(sn.model, x, t, cond)
            bar.update(len(x))
        bar.close()
        for q in tqdm(quantizers, desc="activation ranges", disable=not progress, leave=False):
            q.finish_observing(sn.spec.act_method)
    finally:
        for q in quantizers:
            q.observers = None
    sn.calibrated = True
    sn.calibration_info = {
        "calib_config": {**calib.config.__dict__},
        "calib_rows": len(calib),
        "weights_s": round(t1 - t0, 3),
        "activations_s": round(time.perf_counter() - t1, 3),
    }
    return sn.calibration_info
