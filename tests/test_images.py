from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tmpq.images import make_grid, save_grid, to_uint8


def test_to_uint8_maps_range_exactly():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    assert to_uint8(x)[0, ..., 0].tolist() == [[0, 128], [255, 255]]


def test_grid_layout(tmp_path):
    imgs = torch.full((5, 1, 4, 4), 1.0)
    grid = make_grid(imgs, nrow=3, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 1)
    assert (grid[1:5, 1:5] == 255).all()
    path = save_grid(imgs, tmp_path / "g.png", nrow=3, scale=2)
    assert Image.open(path).size == ((3 * 6 + 2) * 2, (2 * 6 + 2) * 2)  # default padding 2
    assert np.asarray(Image.open(path)).dtype == np.uint8
