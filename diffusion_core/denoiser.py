"""The Denoiser: a network plus every formula that links its output to ε, x̂0 and the training loss.

The network may predict ε (Ho et al. 2020), x0, or v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022).
Whatever it predicts, calling the Denoiser returns ε̂(x_t, t): the contract every sampler uses.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .forward import q_sample
from .noise_levels import loss_weights
from .schedule import NoiseSchedule

Prediction = Literal["eps", "x0", "v"]
PREDICTIONS = ("eps", "x0", "v")
# Images per network pass on a CPU when no gradient is taken (sampling, a distillation's teacher): a larger batch
# runs in slices of this many, image for image the same numbers. Larger passes gain nothing on a CPU, and once an
# activation outgrows glibc's largest mmap threshold (32 MiB, runtime.py) each pass maps and faults it in afresh:
# the default's U-Net takes 1.10-1.15 ms per image in passes of 32-256 images and 1.34 ms in passes of 512, the
# pass of a guided batch of 256 (2-core CPU; benchmarks/network_pass.py, docs/performance.md).
CPU_IMAGES_PER_PASS = 64


class Denoiser(nn.Module):
    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: Prediction = "eps",
                 loss_weighting: str = "none", min_snr_gamma: float = 5.0) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        # w(t) on the squared error of the target (noise_levels.loss_weights); moves with .to(device)
        self.register_buffer("loss_weight", loss_weights(schedule, prediction, loss_weighting,
                                                         min_snr_gamma=min_snr_gamma).float(), persistent=False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """ε̂(x_t, t), whatever the network predicts; on a CPU without gradients, in passes of at most
        CPU_IMAGES_PER_PASS images (`cond` holds per-image tensors or None, sliced alike)."""
        n = CPU_IMAGES_PER_PASS
        if x_t.device.type == "cpu" and len(x_t) > n and not torch.is_grad_enabled():
            return torch.cat([self._eps(x_t[i:i + n], t[i:i + n],
                                        **{k: v if v is None else v[i:i + n] for k, v in cond.items()})
                              for i in range(0, len(x_t), n)])
        return self._eps(x_t, t, **cond)

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        out = self.net(x_t, t, **cond)
        if self.prediction == "eps":
            return out
        if self.prediction == "x0":
            return eps_from_x0(self.schedule, x_t, t, out)
        sqrt_ab = self.schedule.gather("sqrt_alpha_bars", t, x_t)
        sqrt_1mab = self.schedule.gather("sqrt_one_minus_alpha_bars", t, x_t)
        return sqrt_1mab * x_t + sqrt_ab * out  # v: ε = √(1−ᾱ)·x_t + √ᾱ·v

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output for (x0, t, ε)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return (self.schedule.gather("sqrt_alpha_bars", t, x0) * noise
                - self.schedule.gather("sqrt_one_minus_alpha_bars", t, x0) * x0)

    def loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             self_conditioned: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """E[w(t)·‖target − net(x_t, t)‖²], the squared error averaged over each image's elements.

        With w = 1 this is L_simple (Ho et al. 2020, eq. 14); w(t) is `noise_levels.loss_weights`.
        `self_conditioned` [B] bool, for a self-conditioning network (Chen et al. 2022, §3.2): those images are
        first denoised once with no estimate, and that x̂0 (clipped, no gradient) is the estimate the loss's pass
        reads; the others read zeros, as a sampler's first step does.
        """
        x_t = q_sample(self.schedule, x0, t, noise)
        if self_conditioned is not None:
            cond = {**cond, "x0_estimate": self._first_estimate(x_t, t, self_conditioned, **cond)}
        out = self.net(x_t, t, **cond)
        per_image = ((out.float() - self.target(x0, t, noise).float()) ** 2).flatten(1).mean(1)
        return torch.mean(self.loss_weight[t] * per_image)

    @torch.no_grad()
    def _first_estimate(self, x_t: torch.Tensor, t: torch.Tensor, which: torch.Tensor, **cond) -> torch.Tensor:
        """x̂0(x_t) without an estimate for the images in `which`, zeros for the rest."""
        estimate = torch.zeros_like(x_t)
        if which.any():
            mine = {key: value[which] for key, value in cond.items()}
            estimate[which] = predict_x0(self.schedule, x_t[which], t[which],
                                         self(x_t[which], t[which], **mine)).clamp(-1, 1).to(x_t.dtype)
        return estimate


def predict_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t (Ho et al. 2020, eq. 15 rearranged)."""
    return ((x_t - schedule.gather("sqrt_one_minus_alpha_bars", t, x_t) * eps)
            / schedule.gather("sqrt_alpha_bars", t, x_t))


def eps_from_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """ε = (x_t − √ᾱ_t·x0) / √(1−ᾱ_t): the inverse of `predict_x0`."""
    return ((x_t - schedule.gather("sqrt_alpha_bars", t, x_t) * x0)
            / schedule.gather("sqrt_one_minus_alpha_bars", t, x_t))
