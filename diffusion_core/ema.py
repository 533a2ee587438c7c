"""Exponential moving average of the weights: the EMA model is what gets sampled, saved and registered."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ after every optimizer step, with d = min(decay, (1 + n)/(10 + n)).

    The warm-up (n = number of updates so far) keeps early averages from clinging to the random
    initialisation. Under DDP, call `update` with the unwrapped module after the optimizer step:
    the weights are identical on every rank then, so every rank holds the same EMA.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        n = self.num_updates
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
