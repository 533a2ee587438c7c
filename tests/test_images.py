"""PNG grids: the layout checked against torchvision's make_grid (an independent implementation of the same
layout), and a single image, which make_grid returns unframed, framed and saved."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

from diffusion_core.images import save_grid, tile


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("n, nrow", [(2, 1), (5, 3), (7, 4), (10, 10), (12, 20)])
def test_tile_lays_images_out_as_torchvisions_make_grid(n, nrow, channels):
    images = torch.randint(0, 255, (n, channels, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    assert torch.equal(tile(images, nrow), make_grid(images, nrow=nrow, padding=2, pad_value=255))


def test_a_single_image_is_framed_and_saved_as_a_png(tmp_path):
    image = torch.randint(0, 255, (1, 1, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    grid = tile(image, nrow=8)
    assert grid.shape == (3, 5 + 4, 4 + 4)
    assert torch.equal(grid[:, 2:7, 2:6], image[0].expand(3, 5, 4))
    grid[:, 2:7, 2:6] = 255
    assert bool((grid == 255).all())  # the frame
    picture = Image.open(save_grid(image, tmp_path / "one.png", scale=3))
    assert picture.size == (8 * 3, 9 * 3) and picture.mode == "RGB"
