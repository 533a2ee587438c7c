"""Conversions between model space [-1, 1] and uint8 pixels, and PNG grids."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from .atomic import atomic_write_bytes


def to_model_space(images_u8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] → float in [-1, 1]. Do this on the device, after moving the uint8 batch."""
    return images_u8.to(dtype) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] → uint8 [0, 255] (clamped, rounded)."""
    return ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 2) -> Path:
    """Save images [N,C,H,W] (float in [-1, 1] or uint8) as one PNG grid, upscaled `scale`× (nearest)."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid(images.cpu(), nrow=nrow, padding=2, pad_value=255)  # uint8 [3, H, W]
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
