"""Exponential moving average of the weights: the EMA model is what gets sampled, saved and registered."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def power_ema_exponent(std: float) -> float:
    """γ of the power-function EMA whose relative standard deviation is `std` (Karras et al. 2024,
    EDM2, eq. 3): σ_rel² = (γ + 1) / ((γ + 2)² (γ + 3)), solved for γ (σ_rel = 0.10 → γ ≈ 6.94)."""
    if not 0 < std < math.sqrt(1 / 12):  # σ_rel → √(1/12) as γ → −1 (a flat average of the whole run)
        raise ValueError(f"EMA relative std must be in (0, {math.sqrt(1 / 12):.4f}), got {std}")
    low, high = -1.0 + 1e-12, 1e9  # σ_rel falls monotonically in γ: bisect
    for _ in range(200):
        mid = 0.5 * (low + high)
        if (mid + 1) / ((mid + 2) ** 2 * (mid + 3)) > std * std:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ after every optimizer step.

    Fixed length (`std` = 0): d = min(decay, (1 + n)/(10 + n)), n = updates so far; the warm-up keeps
    early averages from clinging to the random initialisation.
    Power function (`std` > 0, EDM2 eq. 2): d = (1 − 1/n)^(γ+1) at update n = 1, 2, …, with γ from
    `power_ema_exponent(std)`. The average then always spans the same fraction of the run so far
    (weights ∝ step^γ), so its length follows the run's length instead of a fixed number of steps.

    Under DDP, call `update` with the unwrapped module after the optimizer step: the weights are
    identical on every rank then, so every rank holds the same EMA.
    """

    def __init__(self, model: nn.Module, decay: float, std: float = 0.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.exponent = power_ema_exponent(std) if std > 0 else None
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay d the next update uses."""
        n = self.num_updates
        if self.exponent is not None:
            return (1 - 1 / (n + 1)) ** (self.exponent + 1)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        ema_params = [p for p in self.model.parameters()]
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, weight)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)
        self.num_updates += 1
