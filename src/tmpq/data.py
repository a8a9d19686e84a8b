"""Image data: Fashion-MNIST from the Debian package files, or a user's folder of images.

Every loader returns float tensors of shape (N, C, 32, 32) scaled to [-1, 1], the range the
diffusion model is trained and sampled in.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tmpq.errors import TmpqError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SIZE = 32
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _read_idx(path: Path) -> np.ndarray:
    """Read one gzipped idx file (the MNIST container format) into a uint8 array."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4:
        raise TmpqError(f"{path} is truncated; reinstall with `apt-get install --reinstall dataset-fashion-mnist`")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise TmpqError(
            f"{path} is not a uint8 idx file; reinstall with `apt-get install --reinstall dataset-fashion-mnist`"
        )
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise TmpqError(f"{path} is truncated; reinstall with `apt-get install --reinstall dataset-fashion-mnist`")
    return data.reshape(dims)


def to_model_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) or (N, C, H, W) in [0, 255] -> float (N, C, 32, 32) in [-1, 1], zero-padded."""
    x = torch.as_tensor(np.array(images_uint8, copy=True)).float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    x = x / 127.5 - 1.0
    h, w = x.shape[-2:]
    if h > IMAGE_SIZE or w > IMAGE_SIZE:
        raise TmpqError(f"images are {h}x{w}, larger than {IMAGE_SIZE}x{IMAGE_SIZE}; resize them first")
    top, left = (IMAGE_SIZE - h) // 2, (IMAGE_SIZE - w) // 2
    # Pad with -1 (black), the background value of Fashion-MNIST.
    return F.pad(x, (left, IMAGE_SIZE - w - left, top, IMAGE_SIZE - h - top), value=-1.0)


def load_fashion_mnist(
    split: str = "train", root: Path | str = FASHION_MNIST_DIR, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images in [-1, 1] of shape (N, 1, 32, 32), int64 labels of shape (N,))."""
    if split not in _SPLIT_FILES:
        raise TmpqError(f"unknown split {split!r}; use one of {sorted(_SPLIT_FILES)}")
    root = Path(root)
    img_name, lbl_name = _SPLIT_FILES[split]
    img_path, lbl_path = root / img_name, root / lbl_name
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise TmpqError(
                f"Fashion-MNIST file {p} not found; install it with "
                "`sudo apt-get install dataset-fashion-mnist` (or pass --data DIR with the four idx .gz files)"
            )
    images = _read_idx(img_path)
    labels = _read_idx(lbl_path)
    if images.shape[0] != labels.shape[0]:
        raise TmpqError(f"{img_path} and {lbl_path} disagree on the number of items; reinstall the dataset package")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return to_model_range(images), torch.as_tensor(labels.astype(np.int64))


def load_image_folder(folder: Path | str, channels: int = 1, limit: int | None = None) -> torch.Tensor:
    """Load every image in `folder` (sorted by name) as (N, channels, 32, 32) in [-1, 1].

    Images must be at most 32x32 (smaller ones are centre-padded), as the built-in model expects.
    """
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise TmpqError(f"image folder {folder} does not exist; pass a directory of .png/.jpg files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise TmpqError(f"no images (.png, .jpg, .jpeg, .bmp, .webp) found in {folder}")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise TmpqError(f"channels must be 1 or 3, got {channels}")
    arrays = []
    for f in files:
        with Image.open(f) as im:
            arr = np.asarray(im.convert(mode))
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if arrays and arr.shape != arrays[0].shape:
            raise TmpqError(
                f"{f.name} is {arr.shape[1]}x{arr.shape[2]} but earlier images are "
                f"{arrays[0].shape[1]}x{arrays[0].shape[2]}; all images in a folder must share one size"
            )
        arrays.append(arr)
    return to_model_range(np.stack(arrays))


def load_images(source: str = "fashion-mnist", split: str = "train", limit: int | None = None) -> torch.Tensor:
    """Images from a named source: 'fashion-mnist' or a path to a folder of images."""
    if source == "fashion-mnist":
        return load_fashion_mnist(split, limit=limit)[0]
    return load_image_folder(source, limit=limit)
