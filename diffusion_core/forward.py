"""The forward (noising) process q(x_t | x_0) and its picture."""

from __future__ import annotations

from pathlib import Path

import torch

from .images import save_grid
from .schedule import NoiseSchedule


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t · x_0 + √(1 - ᾱ_t) · ε (Ho et al. 2020, eq. 4), on x0's device and dtype."""
    return (schedule.gather("sqrt_alpha_bars", t, x0) * x0
            + schedule.gather("sqrt_one_minus_alpha_bars", t, x0) * noise)


def forward_process_images(
    schedule: NoiseSchedule, image: torch.Tensor, frames: int = 10, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One image [C,H,W] in [-1, 1] noised at `frames` evenly spaced t from 0 to T-1, with one shared ε.

    Returns [frames + 1, C, H, W]: the clean image first.
    """
    if image.ndim != 3:
        raise ValueError(f"expected one image [C, H, W], got shape {tuple(image.shape)}")
    noise = torch.randn(image.shape, generator=generator, dtype=image.dtype, device=image.device)
    t = torch.linspace(0, schedule.timesteps - 1, frames).round().long().to(image.device)
    x0 = image.unsqueeze(0).expand(frames, *image.shape)
    noisy = q_sample(schedule, x0, t, noise.unsqueeze(0).expand_as(x0))
    return torch.cat([image.unsqueeze(0), noisy])


def save_forward_process_grid(
    schedule: NoiseSchedule, images: torch.Tensor, path: str | Path, frames: int = 10, seed: int = 0
) -> Path:
    """Rows = images [N,C,H,W] in [-1, 1]; columns = clean, then t = 0 … T-1. Writes a PNG."""
    generator = torch.Generator().manual_seed(seed)
    rows = [forward_process_images(schedule, img.float().cpu(), frames, generator=generator) for img in images]
    return save_grid(torch.cat(rows), path, nrow=frames + 1)
