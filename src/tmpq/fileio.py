"""Atomic result files: a kill mid-write never leaves a truncated JSON or tensor file behind."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def write_json_atomic(path: str | Path, obj: object, indent: int | None = 1) -> None:
    """Write `obj` as JSON to a sibling temp file, then rename it over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    tmp.replace(path)


def save_images_atomic(path: str | Path, images: torch.Tensor) -> None:
    """Write an image tensor (key "images") as safetensors to a sibling temp file, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"images": images.contiguous()}, str(tmp))
    tmp.replace(path)


def read_images(path: str | Path) -> torch.Tensor:
    """The image tensor `save_images_atomic` wrote to `path` (raises OSError, KeyError or a safetensors error when the
    file is missing or damaged: each caller decides whether that is an error or a cache miss)."""
    return load_file(str(path))["images"]
