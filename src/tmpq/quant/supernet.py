"""The quantization super-network: every quantizable layer calibrated once for every candidate width.

This module holds wrapping and switching; tracing (MACs, split points) lives in quant/tracing.py, range calibration
in quant/ranges.py, saving and reloading in quant/persistence.py.

Any per-layer bit allocation is then evaluated by `set_config`, a switch in time linear in the number
of layers (no deepcopy, no recalibration). Memory stays bounded: per candidate a layer keeps uint8
codes and per-channel scales, plus one dequantized float weight for the active setting.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from torch import nn

from tmpq.device import module_device
from tmpq.errors import TmpqError
from tmpq.quant.calibration import CalibrationSet
from tmpq.quant.config import ANY_LAYER, QuantConfig, QuantSpec
from tmpq.quant.cost import CostModel
from tmpq.quant.layers import (
    ATTENTION_PROCESSORS,
    QUANT_LAYERS,
    ActQuantizer,
    MatmulQuant,
    QuantUnit,
    _check_bits,
)
from tmpq.quant.tracing import trace_units
from tmpq.sampling.conditioning import Conditioning, call_denoiser


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the state dict (names, dtypes, shapes, bytes): ties saved calibration to exact weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _attention_type() -> tuple[type, ...] | None:
    """diffusers' attention module classes: the classic `Attention` and the per-model ones (FLUX's) built on
    `AttentionModuleMixin`."""
    try:
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention
    except ImportError:  # diffusers is a core dependency, but a plain-torch model needs none of it
        return None
    return (Attention, AttentionModuleMixin)


QUANT_PROCESSORS = tuple(set(ATTENTION_PROCESSORS.values()))


def _quant_processor(module: nn.Module) -> type[nn.Module] | None:
    """The quantized stand-in for an attention module's processor (None: its matmuls stay in full precision)."""
    return ATTENTION_PROCESSORS.get(type(getattr(module, "processor", None)).__name__)


class SuperNet(nn.Module):
    """Wraps a denoiser `model(x, t)` (or `model(x, t, cond)`); its quantizable layers become switchable twins."""

    def __init__(self, model: nn.Module, spec: QuantSpec, fingerprint: str) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.fingerprint = fingerprint
        self.units: dict[str, QuantUnit] = {}
        self.pinned: dict[str, tuple[int | None, int]] = {}
        self.cost: CostModel | None = None
        self.calibrated = False
        self.calibration_info: dict = {}
        self._config: QuantConfig | None = None
        self._orig_processors: dict[str, object] = {}

    # --- construction -----------------------------------------------------------------------------------
    @classmethod
    def wrap(cls, model: nn.Module, spec: QuantSpec, example: tuple) -> SuperNet:
        """Swap in quantized twins and trace one forward on `example` = (x, t) or (x, t, cond) (MACs per layer,
        skip-concat split points)."""
        if any(
            isinstance(m, QuantUnit) or isinstance(getattr(m, "processor", None), QUANT_PROCESSORS)
            for m in model.modules()
        ):
            raise TmpqError(
                "this model already carries a tmpq super-network (a search, calibration or quantize_ swaps its layers "
                "in place); pass a fresh copy (load it again, or copy.deepcopy it before the first call), or call "
                "unwrap() on the earlier super-network first"
            )
        sn = cls(model, spec, model_fingerprint(model))
        sn.wrap_units()
        if not sn.units:
            raise TmpqError(
                "no quantizable layers found (Conv2d, Linear, diffusers attention) under the include/exclude "
                f"patterns {spec.include} / {spec.exclude}; check the patterns against the model's module names"
            )
        trace_units(sn, example)
        return sn

    def wrap_units(self, only: set[str] | None = None) -> None:
        """Replace each quantizable layer (or those named in `only`, when reloading a saved set) by its twin."""
        spec = self.spec
        attention = _attention_type() if spec.attention_matmuls else None
        for name, module in list(self.model.named_modules()):
            twin_type = QUANT_LAYERS.get(type(module))
            if twin_type is not None and spec.selects(name) and (only is None or name in only):
                pin = spec.pinned(name)
                w_c, a_c = (
                    (tuple(b for b in pin[:1] if b), tuple(b for b in pin[1:] if b))
                    if pin
                    else (
                        spec.w_bits,
                        spec.a_bits,
                    )
                )
                twin = twin_type(module, name, w_c, a_c, fp8=spec.fp8)
                self.replace_module(name, twin)
                self.units[name] = twin
                if pin:
                    self.pinned[name] = pin
            elif attention is not None and isinstance(module, attention) and (stand_in := _quant_processor(module)):
                proc = stand_in(f"{name}.processor", spec.a_bits, spec.fp8)
                kept = [u for u in (proc.qk, proc.av) if spec.selects(u.name) and (only is None or u.name in only)]
                if not kept:
                    continue
                for u in (proc.qk, proc.av):
                    pin = spec.pinned(u.name)
                    if pin:
                        u.__init__(u.name, tuple(b for b in pin[1:] if b), spec.fp8)
                        self.pinned[u.name] = (None, pin[1])
                    if u in kept:
                        self.units[u.name] = u
                self._orig_processors[name] = module.processor
                module.set_processor(proc)
        self.units = dict(sorted(self.units.items()))

    def replace_module(self, name: str, new: nn.Module) -> None:
        """Put `new` in place of the model's submodule `name` (a runtime backend installs its lowered layers)."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)

    def unwrap(self) -> nn.Module:
        """Put the original layers and attention processors back; returns the plain FP model."""
        for name, u in self.units.items():
            if not isinstance(u, MatmulQuant):
                self.replace_module(name, u.base)
        for name, proc in self._orig_processors.items():
            self.model.get_submodule(name).set_processor(proc)
        self.units, self.pinned, self._orig_processors, self._config = {}, {}, {}, None
        self.calibrated = False
        return self.model

    def restore_units(self, units: dict[str, dict], tensors: dict[str, torch.Tensor]) -> None:
        """Put saved split points and quantization parameters (`<unit>.<key>` tensors) back on the twins."""
        for name, info in units.items():
            u = self.units[name]
            if info["split"] is not None:
                u.act.split = int(info["split"])
            prefix = name + "."
            u.load_qparams({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})

    def quantizers(self) -> list[ActQuantizer]:
        return [m for u in self.units.values() for m in u.modules() if isinstance(m, ActQuantizer)]

    def splits(self) -> dict[str, int]:
        """Units whose input is a skip concatenation, quantized as two parts: name -> channels of part one."""
        return {n: u.act.split for n, u in self.units.items() if hasattr(u, "act") and u.act.split is not None}

    # --- calibration ------------------------------------------------------------------------------------
    def calibrate(self, calib: CalibrationSet, batch_size: int = 64, progress: bool = True) -> dict:
        """Ranges for every candidate width (see quant/ranges.py): weights by per-channel MSE clipping,
        activations from one FP pass over `calib`."""
        from tmpq.quant.ranges import calibrate_ranges

        return calibrate_ranges(self, calib, batch_size=batch_size, progress=progress)

    # --- switching --------------------------------------------------------------------------------------
    def validate(self, config: QuantConfig) -> None:
        """Clear errors for unknown or missing layers and for bit-widths that were not calibrated."""
        given = self.resolve(config).as_dict()
        unknown = sorted(set(given) - set(self.units))
        if unknown:
            raise TmpqError(
                f"the config names {len(unknown)} layer(s) this super-network does not have, e.g. {unknown[0]!r}; "
                "valid names are SuperNet.unit_names()"
            )
        missing = sorted(set(self.units) - set(given))
        if missing:
            raise TmpqError(
                f"the config gives no bits for {len(missing)} layer(s), e.g. {missing[0]!r}; "
                "list every layer (use None for full precision) or start from SuperNet.uniform_config()"
            )
        for name, (w, a) in given.items():
            u = self.units[name]
            if isinstance(u, MatmulQuant) and w is not None:
                raise TmpqError(f"{name!r} is an activation-activation matmul; its weight bits must be None")
            if not isinstance(u, MatmulQuant):
                _check_bits(w, u.w_candidates, "weight", name)
            _check_bits(a, u.a_candidates, "activation", name)

    def resolve(self, config: QuantConfig) -> QuantConfig:
        """`config` naming every unit: its `"*"` entry (QuantConfig.uniform) expanded over the units it does not
        name, as `uniform_config` does (pins kept, matmuls at the activation width)."""
        given = config.as_dict()
        if ANY_LAYER not in given:
            return config
        w, a = given.pop(ANY_LAYER)
        return QuantConfig.from_mapping({**self.uniform_config(w, a).as_dict(), **given})

    def set_config(self, config: QuantConfig) -> None:
        if not self.calibrated:
            raise TmpqError("the super-network is not calibrated; call calibrate() (or build_supernet) first")
        config = self.resolve(config)
        self.validate(config)
        for name, (w, a) in config.as_dict().items():
            self.units[name].set_bits(w, a)
        self._config = config

    def set_fp(self) -> None:
        for u in self.units.values():
            u.set_bits(None, None)
        self._config = None

    @property
    def config(self) -> QuantConfig | None:
        """The active configuration (None: full precision)."""
        return self._config

    def unit_names(self) -> list[str]:
        return list(self.units)

    def uniform_config(self, w_bits: int, a_bits: int) -> QuantConfig:
        """Every layer at WxAy (pinned layers keep their pin; matmuls take the activation width)."""
        bits = {}
        for name, u in self.units.items():
            if name in self.pinned:
                bits[name] = self.pinned[name]
            elif isinstance(u, MatmulQuant):
                bits[name] = (None, a_bits)
            else:
                bits[name] = (w_bits, a_bits)
        config = QuantConfig.from_mapping(bits)
        self.validate(config)
        return config

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        return call_denoiser(self.model, x, t, cond)

    # --- persistence ------------------------------------------------------------------------------------
    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """supernet.json + supernet.safetensors in `directory` (see quant/persistence.py)."""
        from tmpq.quant.persistence import save_supernet

        return save_supernet(self, directory, extra)

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module) -> SuperNet:
        """Rebuild the twins on `model` (the same FP weights it was calibrated on) from a saved directory."""
        from tmpq.quant.persistence import load_supernet

        return load_supernet(directory, model)


def build_supernet(
    model: nn.Module,
    calib: CalibrationSet,
    spec: QuantSpec = QuantSpec(),
    batch_size: int = 64,
    progress: bool = True,
    progress_dir: str | Path | None = None,
) -> SuperNet:
    """Wrap `model` and calibrate every candidate bit-width once on `calib`: ranges, then, with
    `spec.reconstruction`, learned rounding per (unit, weight width), kept unit by unit in `progress_dir` so that a
    killed calibration continues where it stopped."""
    sn = SuperNet.wrap(model, spec, calib.rows(slice(0, 1), module_device(model)))
    sn.calibrate(calib, batch_size=batch_size, progress=progress)
    if spec.reconstruction is not None:
        from tmpq.quant.brecq import reconstruct_blocks
        from tmpq.quant.reconstruction import reconstruct_weights

        t0 = time.perf_counter()
        learn = reconstruct_blocks if spec.reconstruction == "brecq" else reconstruct_weights
        info = learn(sn, calib, progress_dir, progress=progress)
        sn.calibration_info["reconstruction"] = {k: v for k, v in info.items() if k != "errors"}
        sn.calibration_info["reconstruction"]["seconds"] = round(time.perf_counter() - t0, 2)
    return sn


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    calib: CalibrationSet,
    spec: QuantSpec = QuantSpec(),
    batch_size: int = 64,
    progress: bool = False,
) -> SuperNet:
    """One-shot PTQ to `config`: calibrate only the widths it uses, then switch to it. `config` may be
    `QuantConfig.uniform(w, a)`, which names no layer (the pinned layers' widths are calibrated too)."""
    ws = {w for _, w, _ in config.bits if w is not None}
    as_ = {a for _, _, a in config.bits if a is not None}
    if ANY_LAYER in config.as_dict():
        ws |= {w for _, w, _ in spec.pin if w is not None}
        as_ |= {a for _, _, a in spec.pin if a is not None}
    spec = spec.narrowed(ws or spec.w_bits, as_ or spec.a_bits)
    sn = build_supernet(model, calib, spec, batch_size=batch_size, progress=progress)
    sn.set_config(config)
    return sn
