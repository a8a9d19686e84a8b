"""Saving and reloading a calibrated super-network: supernet.json (spec, units, costs, calibration info) and
supernet.safetensors (codes and scales). JSON and safetensors only, so a saved set is safe to load."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tmpq.device import module_device
from tmpq.errors import TmpqError
from tmpq.quant.config import QuantSpec
from tmpq.quant.cost import CostModel
from tmpq.quant.supernet import SuperNet, model_fingerprint

SUPERNET_VERSION = 1
JSON_NAME = "supernet.json"
TENSORS_NAME = "supernet.safetensors"


def save_supernet(sn: SuperNet, directory: str | Path, extra: dict | None = None) -> Path:
    """supernet.json (spec, units, costs, calibration info) + supernet.safetensors (codes and scales)."""
    if not sn.calibrated:
        raise TmpqError("nothing to save: the super-network is not calibrated yet")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"{n}.{k}": v.contiguous().cpu() for n, u in sn.units.items() for k, v in u.qparams().items()}
    meta = {
        "version": SUPERNET_VERSION,
        "fingerprint": sn.fingerprint,
        "spec": sn.spec.to_dict(),
        "units": {
            n: {"kind": u.kind, "split": getattr(getattr(u, "act", None), "split", None)} for n, u in sn.units.items()
        },
        "pinned": {n: list(p) for n, p in sn.pinned.items()},
        "cost": sn.cost.to_dict(),
        "calibration": sn.calibration_info,
        **(extra or {}),
    }
    for name, payload in ((TENSORS_NAME, None), (JSON_NAME, meta)):
        tmp = directory / (name + ".tmp")
        if payload is None:
            save_file(tensors, str(tmp), metadata={"fingerprint": sn.fingerprint})
        else:
            tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(directory / name)
    return directory


def load_supernet(directory: str | Path, model: nn.Module) -> SuperNet:
    """Rebuild the twins on `model` (the same FP weights it was calibrated on) from a saved directory."""
    directory = Path(directory)
    jpath, tpath = directory / JSON_NAME, directory / TENSORS_NAME
    if not jpath.is_file() or not tpath.is_file():
        raise TmpqError(f"{directory} holds no saved super-network ({JSON_NAME} + {TENSORS_NAME}); calibrate first")
    try:
        meta = json.loads(jpath.read_text())
        tensors = load_file(str(tpath), device=str(module_device(model)))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise TmpqError(f"the super-network in {directory} is unreadable ({e}); re-calibrate") from None
    if meta.get("version") != SUPERNET_VERSION:
        raise TmpqError(f"{jpath} has version {meta.get('version')}, this tmpq reads {SUPERNET_VERSION}")
    fp = model_fingerprint(model)
    if fp != meta["fingerprint"]:
        raise TmpqError(
            f"the super-network in {directory} was calibrated for different model weights; "
            "re-calibrate it for this model"
        )
    sn = SuperNet(model, QuantSpec.from_dict(meta["spec"]), fp)
    sn.wrap_units(only=set(meta["units"]))
    try:
        if set(sn.units) != set(meta["units"]):
            raise TmpqError("the model's layers do not match the saved super-network")
        sn.restore_units(meta["units"], tensors)
        sn.pinned = {n: (p[0], p[1]) for n, p in meta["pinned"].items()}
        sn.cost = CostModel.from_dict(meta["cost"])
        sn.calibrated = True
        sn.calibration_info = meta["calibration"]
        sn.set_fp()
        for u in sn.units.values():  # every candidate must be present: a truncated file fails here, not mid-search
            for w in getattr(u, "w_candidates", ()) or (None,):
                for a in u.a_candidates or (None,):
                    u.set_bits(w, a)
        sn.set_fp()
    except (TmpqError, AttributeError, KeyError) as e:
        sn.unwrap()  # leave the caller's model as it was
        raise TmpqError(
            f"the super-network in {directory} does not fit this model or is incomplete ({e}); re-calibrate"
        ) from None
    return sn
