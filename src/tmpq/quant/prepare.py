"""Calibration set + calibrated super-network for a run directory, reused when they still match."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from tmpq.errors import TmpqError
from tmpq.fileio import write_json_atomic
from tmpq.models.loading import LoadedModel
from tmpq.quant.calibration import CalibConfig, CalibrationSet, collect_calibration
from tmpq.quant.config import QuantSpec
from tmpq.quant.supernet import SuperNet, build_supernet, model_fingerprint

CALIB_FILE = "calib.safetensors"
SUPERNET_DIR = "supernet"
RECON_PROGRESS_DIR = "supernet.reconstruction"
"""Learned rounding of each finished unit, while a reconstruction runs (resumed by unit after a kill)."""
MODEL_FILE = "model.json"


def claim_run_dir(loaded: LoadedModel, run_dir: str | Path) -> str:
    """Tie a run directory to one model's weights (RUN/model.json); refuse a directory of another model, so
    its results are never mixed with or overwritten by this one's. Returns the weights' fingerprint."""
    run_dir = Path(run_dir)
    fp = model_fingerprint(loaded.denoiser)
    path = run_dir / MODEL_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("fingerprint") != fp:
            raise TmpqError(
                f"{run_dir} holds results of another model ({old.get('model', 'unknown')}, other weights); "
                "its files are left untouched: pick another --run-dir for this model"
            )
        return fp
    write_json_atomic(path, {"model": loaded.spec, "fingerprint": fp})
    return fp


def prepare_supernet(
    loaded: LoadedModel,
    run_dir: str | Path,
    calib_config: CalibConfig = CalibConfig(),
    spec: QuantSpec = QuantSpec(),
    progress: bool = True,
) -> tuple[SuperNet, CalibrationSet, dict]:
    """Load RUN/calib.safetensors and RUN/supernet when they were made with these settings for these
    weights; otherwise (re)build them. Returns the super-network (wrapping `loaded.denoiser`), the
    calibration set and what it cost: image-forwards and seconds, zero when reused. A text-to-image model is
    calibrated on its prompts; their embeddings' digest is part of the calibration config, so other prompts
    recalibrate."""
    cond = loaded.conditioning(calib_config.num_samples)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = claim_run_dir(loaded, run_dir)
    # the weights' fingerprint keys the calibration set, so a run directory that lost its model.json is never
    # calibrated from another model's inputs
    calib_config = replace(calib_config, conditioning=cond.digest() if cond is not None else "", model=fingerprint)
    info = {
        "calib_forwards": 0,
        "collect_forwards": 0,
        "calibrate_forwards": 0,
        "calib_collect_s": 0.0,
        "calibrate_s": 0.0,
        "reused": True,
    }
    cpath = run_dir / CALIB_FILE
    calib = None
    if cpath.is_file():
        calib = CalibrationSet.open(cpath)  # rows read from the file as calibration uses them
        if calib.config != calib_config:
            calib = None
    if calib is None:
        t0 = time.perf_counter()
        calib = collect_calibration(
            loaded.denoiser, loaded.schedule, loaded.sample_shape, calib_config, progress=progress, cond=cond
        )
        calib.save(cpath)
        calib = CalibrationSet.open(cpath)  # release the collected rows: calibration streams them from the file
        info |= {
            "calib_forwards": len(calib),
            "collect_forwards": len(calib),
            "calib_collect_s": round(time.perf_counter() - t0, 2),
            "reused": False,
        }
    sdir = run_dir / SUPERNET_DIR
    if (sdir / "supernet.json").is_file():
        try:
            sn = SuperNet.load(sdir, loaded.denoiser)  # on failure the model is left unwrapped
        except TmpqError:
            sn = None
        if sn is not None:
            # "": saved before prompts / before the model key (such a super-network is recalibrated)
            done = {"conditioning": "", "model": "", **sn.calibration_info.get("calib_config", {})}
            if sn.spec.covers(spec) and done == asdict(calib_config):  # e.g. all widths, for a one-width search
                return sn, calib, info
            sn.unwrap()  # stale: calibrate afresh on the same, untouched weights
    t0 = time.perf_counter()
    pdir = run_dir / RECON_PROGRESS_DIR
    sn = build_supernet(loaded.denoiser, calib, spec, progress=progress, progress_dir=pdir)
    sn.save(sdir)
    if pdir.is_dir():  # the saved super-network now holds every unit's learned codes
        shutil.rmtree(pdir)
    info |= {
        "calibrate_s": round(time.perf_counter() - t0, 2),
        "calib_forwards": info["calib_forwards"] + len(calib),
        "calibrate_forwards": len(calib),
        "reused": False,
    }
    return sn, calib, info
