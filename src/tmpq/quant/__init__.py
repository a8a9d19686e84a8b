"""Quantization: switchable quantized twins, timestep-aware calibration, the super-network, BitOPs."""

from tmpq.quant.calibration import CalibConfig, CalibrationSet, collect_calibration
from tmpq.quant.config import QuantConfig, QuantSpec
from tmpq.quant.cost import CostModel, UnitCost
from tmpq.quant.supernet import SuperNet, build_supernet, model_fingerprint, quantize_

__all__ = [
    "CalibConfig",
    "CalibrationSet",
    "CostModel",
    "QuantConfig",
    "QuantSpec",
    "SuperNet",
    "UnitCost",
    "build_supernet",
    "collect_calibration",
    "model_fingerprint",
    "quantize_",
]
