"""What every result file records: versions, checksums, time; so a number can be traced to its inputs."""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
from importlib import metadata
from pathlib import Path

import torch

_PACKAGES = ("tmpq", "torch", "diffusers", "torchmetrics", "safetensors", "numpy")


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC ...", "Intel(R) Xeon(R) ..."): the instruction set alone does not tell two
    machines apart (both of this project's CPUs report AVX512), and quantized results can differ between them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(inputs: dict[str, Path | str] | None = None) -> dict:
    """Versions, machine, UTC time and sha256 of each input file."""
    return {
        "versions": versions(),
        "machine": {
            "cpu": cpu_model(),
            "platform": platform.platform(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
        },
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "inputs_sha256": {k: file_sha256(v) for k, v in (inputs or {}).items() if Path(v).is_file()},
    }
