"""Noise schedules for the discrete-time forward process.

Index convention: the paper's t = 1..T is stored at index t - 1, so every table has length T and
`alpha_bars[0]` is ᾱ_1 (the least noisy step). ᾱ_0 = 1 (clean data) is where every sampler's last step goes.

All tables are computed in float64 on the CPU; `table(name, like)` hands out a copy on another
device (cached, so a sampling loop never re-uploads them).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

ScheduleKind = Literal["linear", "cosine"]
SCHEDULE_KINDS = ("linear", "cosine")


class NoiseSchedule:
    """β_t, α_t = 1 - β_t, ᾱ_t = ∏ α_s and the quantities derived from them.

    linear: β_t evenly spaced from `beta_start` to `beta_end` (Ho et al. 2020, §4: 1e-4 → 0.02).
    cosine: ᾱ_t = f(t) / f(0), f(t) = cos²(((t/T) + s) / (1 + s) · π/2), β_t = 1 - ᾱ_t/ᾱ_{t-1}
            clipped at `max_beta` (Nichol & Dhariwal 2021, eq. 17), then ᾱ recomputed as ∏(1 - β).
    """

    def __init__(
        self,
        timesteps: int = 1000,
        kind: ScheduleKind = "linear",
        *,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
        max_beta: float = 0.999,
    ) -> None:
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
        if not isinstance(timesteps, int) or timesteps < 1:
            raise ValueError(f"timesteps must be a positive integer, got {timesteps!r}")
        if kind == "linear" and not (0.0 < beta_start <= beta_end < 1.0):
            raise ValueError(
                f"linear schedule needs 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}"
            )
        if kind == "cosine" and not (cosine_s > 0 and 0 < max_beta < 1):
            raise ValueError(f"cosine schedule needs cosine_s > 0 and 0 < max_beta < 1, got {cosine_s}, {max_beta}")

        self.timesteps = timesteps
        self.kind = kind
        self.params = dict(beta_start=beta_start, beta_end=beta_end, cosine_s=cosine_s, max_beta=max_beta)

        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        else:
            betas = (1.0 - cosine_alpha_bar(torch.arange(1, timesteps + 1), timesteps, cosine_s)
                     / cosine_alpha_bar(torch.arange(0, timesteps), timesteps, cosine_s)).clamp(max=max_beta)

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bars = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alpha_bars = self.alpha_bars.sqrt()
        self.sqrt_one_minus_alpha_bars = (1.0 - self.alpha_bars).sqrt()
        # Signal-to-noise ratio ᾱ / (1 - ᾱ), in log form (used for log-SNR step spacing).
        self.log_snr = torch.log(self.alpha_bars) - torch.log1p(-self.alpha_bars)
        # The lowest log-SNR the schedule's own formula reaches: where the cosine schedule clips β at
        # max_beta (its last index, at T = 1000), λ drops by ~7 in one step, an artefact of the clip.
        unclipped = torch.nonzero(betas < max_beta).flatten() if kind == "cosine" else torch.arange(timesteps)
        self.usable_log_snr_min = float(self.log_snr[int(unclipped.max()) if len(unclipped) else timesteps - 1])
        self._device_cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"NoiseSchedule(timesteps={self.timesteps}, kind={self.kind!r})"

    def to_dict(self) -> dict:
        return {"timesteps": self.timesteps, "kind": self.kind, **self.params}

    def table(self, name: str, device: torch.device | str) -> torch.Tensor:
        """The table `name` on `device` (float64, or float32 where the device lacks float64)."""
        device = torch.device(device)
        key = (name, device)
        cached = self._device_cache.get(key)
        if cached is None:
            host = getattr(self, name)
            dtype = torch.float32 if device.type == "mps" else torch.float64
            cached = host.to(device=device, dtype=dtype)
            self._device_cache[key] = cached
        return cached

    def gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] shaped [B, 1, ..., 1] to broadcast against `like`, in `like`'s dtype and device."""
        values = self.table(name, like.device)[t]
        return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def cosine_alpha_bar(t: torch.Tensor, timesteps: int, s: float = 0.008) -> torch.Tensor:
    """f(t) / f(0) with f(t) = cos²(((t/T) + s) / (1 + s) · π/2) (Nichol & Dhariwal 2021, eq. 17)."""

    def f(u: torch.Tensor) -> torch.Tensor:
        return torch.cos((u / timesteps + s) / (1 + s) * math.pi / 2) ** 2

    t = t.to(torch.float64)
    return f(t) / f(torch.zeros((), dtype=torch.float64))
