from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from tmpq.data import FASHION_CLASSES, load_fashion_mnist, load_image_folder, to_model_range
from tmpq.errors import TmpqError


def test_fashion_mnist_shapes_range_labels():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10_000, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(len(FASHION_CLASSES)))
    assert torch.bincount(y).tolist() == [1000] * 10  # the test split is balanced
    # 2-pixel padding is background (-1) everywhere
    assert (x[:, :, :2] == -1).all() and (x[:, :, -2:] == -1).all() and (x[..., :2] == -1).all()


def test_limit_and_train_split():
    x, y = load_fashion_mnist("train", limit=10)
    assert x.shape == (10, 1, 32, 32) and y.shape == (10,)


def test_missing_dataset_names_the_fix(tmp_path):
    with pytest.raises(TmpqError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x00" * 5)
    with pytest.raises(TmpqError, match="truncated"):
        load_fashion_mnist("test", root=tmp_path)


def test_unknown_split():
    with pytest.raises(TmpqError, match="unknown split"):
        load_fashion_mnist("val")


def test_image_folder_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    x = load_image_folder(tmp_path)
    assert x.shape == (3, 1, 32, 32)
    torch.testing.assert_close(x, to_model_range(np.stack(arrays)))


def test_image_folder_errors(tmp_path):
    with pytest.raises(TmpqError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(TmpqError, match="no images"):
        load_image_folder(tmp_path)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(TmpqError, match="share one size"):
        load_image_folder(tmp_path)


def test_wrong_image_size_is_rejected():
    with pytest.raises(TmpqError, match="larger than 32x32"):
        to_model_range(np.zeros((1, 64, 64), np.uint8))
