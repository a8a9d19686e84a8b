"""QuantSpec (what to calibrate) and QuantConfig (which bits each layer uses): frozen, JSON round trip."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

from tmpq.errors import TmpqError
from tmpq.quant.primitives import FORMATS_8BIT, MAX_BITS
from tmpq.serialization import DictConfig

CONFIG_VERSION = 1


def _bits_tuple(values: Iterable[int], what: str) -> tuple[int, ...]:
    out = tuple(sorted({int(v) for v in values}))
    if not out:
        raise TmpqError(f"{what} candidates are empty; give at least one bit-width")
    bad = [b for b in out if not 1 <= b <= MAX_BITS]
    if bad:
        raise TmpqError(f"{what} bit-widths {bad} are not supported; use 1..{MAX_BITS}")
    return out


RECONSTRUCTIONS = (None, "adaround", "brecq")
RECON_INPUTS = ("fp", "quantized", "mixed")
RECON_PRESETS = {
    "demo": {"recon_iters": 200, "recon_batch": 16, "recon_rows": 256},
    "paper": {"recon_iters": 20_000, "recon_batch": 32, "recon_rows": 1024},
}


@dataclass(frozen=True)
class QuantSpec(DictConfig):
    """Which layers are quantizable, their candidate bit-widths, and how ranges are calibrated.

    `pin` maps a layer-name pattern (fnmatch) to fixed (w_bits, a_bits), None meaning full precision. By
    default the first and last convolutions keep 8-bit weights, as Q-Diffusion and most PTQ work do, and the
    first convolution's input (the raw x_t) stays in full precision: with x_t at 8 bits per tensor the built-in
    model's W8A8 ε̂ is 31 % wrong (relative MSE) at t = 0 instead of 1.9 %, because the signal to predict there
    is far below one 8-bit step of x_t (bench/quant_error.py); that input is 0.15 % of the model's MACs.

    A DiT's counterparts are pinned likewise, as Q-DiT and ViDiT-Q do: its patch embedding (`pos_embed.proj`, whose
    input is x_t) at W8 with a full-precision input, and at W8A8 its final adaLN and projection (`proj_out_1/2`),
    the adaLN-Zero modulation of every block (`norm1.linear`) and the timestep embedders inside them. On the
    built-in DiT these are 1.5 % of the MACs and, per MAC, 16x (adaLN), 44x (final) and 3,200x (patch embedding) as
    sensitive at 4-bit weights as the MLP; holding them at 8 bits takes uniform W4A6's FID to the FP sampler from
    332.7 to 33.8 for 3.6 % more BitOPs (bench/transformer_sensitivity.py, docs/results.md).
    """

    w_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    a_bits: tuple[int, ...] = (4, 5, 6, 8)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    pin: tuple[tuple[str, int, int | None], ...] = (
        ("*conv_in", 8, None),
        ("*conv_out", 8, 8),
        ("*pos_embed.proj", 8, None),
        ("*proj_out_1", 8, 8),
        ("*proj_out_2", 8, 8),
        ("*norm1.linear", 8, 8),
        ("*norm1.emb.timestep_embedder.linear_?", 8, 8),
    )
    attention_matmuls: bool = True
    split_concat: bool = True
    act_method: str = "mse"
    act_max_values: int = 1 << 16
    # None: nearest rounding in calibrated ranges | "adaround": learned rounding per layer | "brecq": learned rounding
    # per block and learned activation steps (quant/brecq.py). BRECQ by default: uniform W6A6 on the built-in model
    # scores 57.8 FID against 65.9 range-only (5,000 samples, docs/results.md), as every peer's 4-6-bit results use it
    reconstruction: str | None = "brecq"
    recon_iters: int = 200  # steps per (unit or block, weight width); the `paper` preset uses 20,000
    recon_batch: int = 16  # calibration inputs per step
    recon_rows: int = 256  # calibration inputs reconstructed on, spread evenly over the set (all timesteps)
    # what a BRECQ block learns from: "fp", the FP model's block inputs, or "quantized", the inputs the model gives
    # with every earlier block already at the width being learned (BRECQ's and Q-Diffusion's asymmetric
    # reconstruction: quantized input, FP output, so a block also corrects the error that reaches it), or "mixed",
    # each input element from either at even odds, redrawn every batch (QDrop's input mixing)
    recon_inputs: str = "fp"
    # what every 8-bit candidate (weights and activations, pins included) is: "int8" affine codes, or "fp8_e4m3"
    # (per-channel weight / per-tensor activation scales, no rounding to learn: reconstruction skips it)
    format8: str = "int8"
    # layers (name patterns) whose rounding is bias-corrected (quant/bias_correction.py): the output layer, whose
    # offset is ε̂'s own (the built-in model's 8-bit conv_out shifted ε̂ by +0.007 at every timestep); () rounds every
    # layer to nearest. Inner layers are left alone: correcting them by rounding raised the W4 error (docs/search.md)
    bias_correction: tuple[str, ...] = ("*conv_out",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "w_bits", _bits_tuple(self.w_bits, "weight"))
        object.__setattr__(self, "a_bits", _bits_tuple(self.a_bits, "activation"))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if isinstance(self.bias_correction, bool):  # True: the default layers; False: none
            object.__setattr__(self, "bias_correction", QuantSpec.bias_correction if self.bias_correction else ())
        if isinstance(self.bias_correction, str) or not all(isinstance(p, str) for p in self.bias_correction):
            raise TmpqError(
                f"bias_correction takes layer-name patterns (e.g. ('*conv_out',)), got {self.bias_correction!r}"
            )
        object.__setattr__(self, "bias_correction", tuple(self.bias_correction))
        raw = [(p, *wa) for p, wa in self.pin.items()] if isinstance(self.pin, Mapping) else self.pin

        def opt(v):
            return None if v is None else int(v)

        pins = tuple((str(p), opt(w), opt(a)) for p, w, a in raw)
        for p, w, a in pins:
            if w is not None:
                _bits_tuple([w], f"pinned weight ({p})")
            if a is not None:
                _bits_tuple([a], f"pinned activation ({p})")
        object.__setattr__(self, "pin", pins)
        if self.act_method not in ("mse", "minmax"):
            raise TmpqError(f"act_method must be 'mse' or 'minmax', got {self.act_method!r}")
        if self.act_max_values < 1024:
            raise TmpqError(f"act_max_values={self.act_max_values} is too small to estimate a range; use >= 1024")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise TmpqError(
                f"reconstruction must be one of {[r or 'none' for r in RECONSTRUCTIONS]}, got {self.reconstruction!r}"
            )
        if self.recon_inputs not in RECON_INPUTS:
            raise TmpqError(
                f"recon_inputs must be one of {list(RECON_INPUTS)}, got {self.recon_inputs!r} (--recon-inputs)"
            )
        if self.recon_inputs != "fp" and self.reconstruction != "brecq":
            raise TmpqError(
                f"recon_inputs={self.recon_inputs!r} is a choice of block reconstruction; it needs "
                f"reconstruction='brecq' (got {self.reconstruction!r}), or recon_inputs='fp' (--recon-inputs fp)"
            )
        if self.format8 not in FORMATS_8BIT:
            raise TmpqError(f"format8 must be one of {FORMATS_8BIT}, got {self.format8!r} (--format8)")
        for name in ("recon_iters", "recon_batch", "recon_rows"):
            if getattr(self, name) < 1:
                raise TmpqError(f"{name} must be >= 1, got {getattr(self, name)} (--{name.replace('_', '-')})")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantSpec:
        """As DictConfig's; a spec recorded before `bias_correction` existed rounded every layer to nearest, so it
        reads as () (its super-network and exports hold uncorrected codes), not as today's default; one recorded
        before `reconstruction` existed was range-only, and one before `recon_inputs` learned from FP inputs."""
        return super().from_dict({"bias_correction": (), "reconstruction": None, "recon_inputs": "fp", **d})

    def with_reconstruction(self, method: str | None, preset: str = "demo") -> QuantSpec:
        """This spec with `method` ("adaround", "brecq", or None for range-only) at a cost preset: `demo` fits
        `make demo` on 2 CPU cores, `paper` is the reference's 20,000 iterations per unit and width (a GPU's job)."""
        if preset not in RECON_PRESETS:
            raise TmpqError(f"reconstruction preset must be one of {sorted(RECON_PRESETS)}, got {preset!r}")
        return replace(self, reconstruction=method, **RECON_PRESETS[preset])

    def narrowed(self, w_bits: Iterable[int], a_bits: Iterable[int]) -> QuantSpec:
        """This spec offering only these weight and activation widths (pinned layers keep their pins whatever the
        candidates): what a search that keeps one uniform precision needs calibrated."""
        return replace(self, w_bits=tuple(w_bits), a_bits=tuple(a_bits))

    def covers(self, other: QuantSpec) -> bool:
        """Whether a super-network calibrated under this spec serves `other` as well: the same settings, and every
        width `other` offers among this spec's (each width is calibrated and reconstructed on its own, so the extra
        ones change nothing of the shared ones)."""
        same = replace(self, w_bits=other.w_bits, a_bits=other.a_bits) == other
        return same and set(other.w_bits) <= set(self.w_bits) and set(other.a_bits) <= set(self.a_bits)

    @property
    def fp8(self) -> bool:
        """Whether 8-bit candidates are float8 e4m3 (else int8)."""
        return self.format8 == "fp8_e4m3"

    def selects(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.include) and not any(fnmatchcase(name, p) for p in self.exclude)

    def corrects(self, name: str) -> bool:
        """Whether layer `name`'s rounding is bias-corrected."""
        return any(fnmatchcase(name, p) for p in self.bias_correction)

    def pinned(self, name: str) -> tuple[int | None, int | None] | None:
        for p, w, a in self.pin:
            if fnmatchcase(name, p):
                return w, a
        return None


ANY_LAYER = "*"
"""A QuantConfig entry for every layer it does not name (see `QuantConfig.uniform`)."""


@dataclass(frozen=True)
class QuantConfig:
    """Bits per quantizable unit: name -> (w_bits, a_bits); None is full precision.

    Hashable (a tuple, sorted by name), so a search can cache evaluated configs by value.
    """

    bits: tuple[tuple[str, int | None, int | None], ...] = field(default=())

    def __post_init__(self) -> None:
        items = [(n, *wa) for n, wa in self.bits.items()] if isinstance(self.bits, Mapping) else self.bits
        norm = [(str(n), None if w is None else int(w), None if a is None else int(a)) for n, w, a in items]
        names = [n for n, _, _ in norm]
        if len(set(names)) != len(names):
            raise TmpqError("a QuantConfig lists some layer twice; give each layer once")
        object.__setattr__(self, "bits", tuple(sorted(norm)))

    @classmethod
    def from_mapping(cls, bits: Mapping[str, tuple[int | None, int | None]]) -> QuantConfig:
        return cls(tuple((k, w, a) for k, (w, a) in bits.items()))

    @classmethod
    def uniform(cls, w_bits: int | None, a_bits: int | None, **overrides: tuple[int | None, int | None]) -> QuantConfig:
        """Every layer at WxAy without naming them: the entry `"*"` stands for each layer the config does not
        name, resolved by the super-network it is applied to (pinned layers keep their pins, attention matmuls
        take the activation width). `overrides` name single layers: `uniform(6, 6, **{"conv_in": (8, None)})`."""
        return cls.from_mapping({ANY_LAYER: (w_bits, a_bits), **overrides})

    def as_dict(self) -> dict[str, tuple[int | None, int | None]]:
        return {n: (w, a) for n, w, a in self.bits}

    def __getitem__(self, name: str) -> tuple[int | None, int | None]:
        for n, w, a in self.bits:
            if n == name:
                return w, a
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.bits)

    def to_json(self) -> str:
        return json.dumps({"version": CONFIG_VERSION, "bits": {n: [w, a] for n, w, a in self.bits}}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise TmpqError(f"QuantConfig JSON is not valid JSON ({e}); was the file truncated?") from None
        if not isinstance(d, dict) or d.get("version") != CONFIG_VERSION or not isinstance(d.get("bits"), dict):
            raise TmpqError(f"not a QuantConfig JSON of version {CONFIG_VERSION} (expected keys 'version' and 'bits')")
        return cls.from_mapping({k: tuple(v) for k, v in d["bits"].items()})
