"""Conversions between model space [-1, 1] and uint8 pixels, and PNG grids."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from PIL import Image

from .atomic import atomic_write_bytes


def to_model_space(images_u8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] → float in [-1, 1]. Do this on the device, after moving the uint8 batch."""
    return images_u8.to(dtype) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] → uint8 [0, 255] (clamped, rounded)."""
    return ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def tile(images_u8: torch.Tensor, nrow: int, padding: int = 2, pad_value: int = 255) -> torch.Tensor:
    """uint8 images [N, C, H, W] (C = 1 or 3) → one RGB picture [3, rows·(H + padding) + padding,
    cols·(W + padding) + padding]: the images row by row, `nrow` to a row (cols = min(nrow, N)), framed by
    `padding` pixels of `pad_value`. (torchvision's make_grid lays out the same; importing torchvision costs
    every process that draws a grid about two seconds.)"""
    n, _, height, width = images_u8.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = images_u8.new_full((3, rows * (height + padding) + padding, cols * (width + padding) + padding), pad_value)
    for k, image in enumerate(images_u8):
        row, col = divmod(k, cols)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[:, top:top + height, left:left + width] = image.expand(3, height, width)
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 2) -> Path:
    """Save images [N,C,H,W] (float in [-1, 1] or uint8) as one PNG grid, upscaled `scale`× (nearest)."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = tile(images.cpu(), nrow)  # uint8 [3, H, W]
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def grid_by_class(images: torch.Tensor, labels: torch.Tensor | None, max_images: int) -> tuple[torch.Tensor, int | None]:
    """(images, images per row) for `save_grid`: the first `max_images` in a square grid, or, for
    samples of several classes, up to `max_images` arranged one row per class (the same number each)."""
    classes = None if labels is None else labels.unique()
    if classes is None or len(classes) < 2:
        return images[:max_images], None
    per_row = min(max(1, max_images // len(classes)), *(int((labels == c).sum()) for c in classes))
    return torch.cat([images[labels == c][:per_row] for c in classes]), per_row
