"""BitOPs and model size of a (QuantConfig, number of steps), from MACs counted once.

BitOPs = steps × Σ_layers MACs × w_bits × a_bits (activation-activation matmuls: a_bits²), the
cost measure of the mixed-precision literature; full precision counts as 32 × 32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tmpq.errors import TmpqError
from tmpq.quant.config import QuantConfig

FP_BITS = 32


@dataclass(frozen=True)
class UnitCost:
    kind: str  # conv | linear | matmul
    macs: int  # per image, per denoiser call
    weight_params: int
    bias_params: int


@dataclass(frozen=True)
class CostModel:
    units: Mapping[str, UnitCost]
    other_params: int = 0  # parameters outside quantizable units (norms, embeddings): kept at FP

    @property
    def macs(self) -> int:
        return sum(u.macs for u in self.units.values())

    def _bits(self, config: QuantConfig) -> dict[str, tuple[int, int]]:
        d = config.as_dict()
        missing = set(self.units) - set(d)
        if missing:
            raise TmpqError(f"the config gives no bits for {len(missing)} layers (e.g. {sorted(missing)[0]!r})")
        return {n: (w or FP_BITS, a or FP_BITS) for n, (w, a) in d.items()}

    def bitops(self, config: QuantConfig | None, steps: int) -> int:
        """Bit operations of `steps` denoiser calls at `config` (None: full precision), per image."""
        if steps < 1:
            raise TmpqError(f"steps must be >= 1, got {steps}")
        if config is None:
            return steps * self.macs * FP_BITS * FP_BITS
        bits = self._bits(config)
        total = 0
        for name, u in self.units.items():
            w, a = bits[name]
            total += u.macs * (a * a if u.kind == "matmul" else w * a)
        return steps * total

    def size_bits(self, config: QuantConfig | None) -> int:
        """Stored model size: weights at their bit-width; biases, scales and other parameters at 32 bits."""
        bits = None if config is None else self._bits(config)
        total = self.other_params * FP_BITS
        for name, u in self.units.items():
            w = FP_BITS if bits is None else bits[name][0]
            total += u.weight_params * w + u.bias_params * FP_BITS
        return total

    def to_dict(self) -> dict:
        return {
            "other_params": self.other_params,
            "units": {n: [u.kind, u.macs, u.weight_params, u.bias_params] for n, u in self.units.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> CostModel:
        return cls({n: UnitCost(*v) for n, v in d["units"].items()}, int(d["other_params"]))
