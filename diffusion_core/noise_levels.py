"""Where training spends its noise levels: how t is drawn, and how much each t's error counts.

Kingma & Gao (2023) show the usual objectives are one objective weighted differently over noise
levels; these two tables are that weighting, split into its two halves:

- `timestep_probabilities`: p(t), the chance a training example gets noise level t.
- `loss_weights`: w(t), the factor on the squared error of the network's own target at t.
- `TimestepDraw`: a batch of t from p(t), independently or stratified (one draw per 1/B of p's mass).

The effective weight of noise level t in the loss is p(t)·w(t). Both are float64 tables of length T.
"""

from __future__ import annotations

import math

import torch

from .schedule import NoiseSchedule

NOISE_LEVEL_DISTRIBUTIONS = ("uniform", "log_snr_normal")
LOSS_WEIGHTINGS = ("none", "min_snr")


def timestep_probabilities(schedule: NoiseSchedule, distribution: str = "uniform", *,
                           log_snr_mean: float = 2.4, log_snr_std: float = 2.4) -> torch.Tensor:
    """p(t) over the T discrete noise levels.

    uniform: 1/T (Ho et al. 2020, Alg. 1).
    log_snr_normal: λ = log(ᾱ/(1−ᾱ)) ~ N(log_snr_mean, log_snr_std²), and t gets the probability mass
    of the λ interval nearest to λ_t (edges halfway between neighbouring λ's, the outer bins open), so
    p(t) = Φ((e_{t−1} − μ)/s) − Φ((e_t − μ)/s). EDM's log-normal σ (Karras et al. 2022, P_mean = −1.2,
    P_std = 1.2 on ln σ with σ² = (1−ᾱ)/ᾱ) is λ ~ N(2.4, 2.4²), since λ = −2 ln σ.
    """
    T = schedule.timesteps
    if distribution == "uniform":
        return torch.full((T,), 1.0 / T, dtype=torch.float64)
    if distribution != "log_snr_normal":
        raise ValueError(f"unknown noise-level distribution {distribution!r}; choose one of "
                         f"{', '.join(NOISE_LEVEL_DISTRIBUTIONS)}")
    if not log_snr_std > 0:
        raise ValueError(f"log_snr_std must be > 0, got {log_snr_std}")
    lam = schedule.log_snr  # decreasing in t
    edges = 0.5 * (lam[:-1] + lam[1:])
    inf = torch.tensor([math.inf], dtype=torch.float64)
    upper, lower = torch.cat([inf, edges]), torch.cat([edges, -inf])
    normal = torch.distributions.Normal(torch.tensor(log_snr_mean, dtype=torch.float64),
                                        torch.tensor(log_snr_std, dtype=torch.float64))
    return normal.cdf(upper) - normal.cdf(lower)


class TimestepDraw:
    """Draws a batch of noise levels t ∈ {0, …, timesteps − 1} from p(t) (`probabilities`, or None for uniform).

    Independent: each t on its own (randint, or multinomial on the table).
    Stratified: the low-discrepancy draw of Kingma et al. (2021, VDM, App. I.1). One u ~ U[0, 1) places
    the batch's quantiles at q_i = (u + i)/n, and t_i = F⁻¹(q_i) with F the CDF of p(t). Each t_i is still
    distributed as p(t), so the loss stays unbiased. Each 1/n of p's mass now holds exactly one t, so the
    batch's loss varies less from step to step: for every k, #{t_i ≤ k} is within 1 of n·F(k).
    """

    def __init__(self, probabilities: torch.Tensor | None, timesteps: int, *, stratified: bool = False) -> None:
        self.probabilities, self.timesteps, self.stratified = probabilities, timesteps, stratified
        # F, built once: the stratified draw inverts it at every training step
        self.cdf = None if probabilities is None else probabilities.to(torch.float64).cumsum(0)

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        device = generator.device
        if not self.stratified:
            if self.probabilities is None:
                return torch.randint(0, self.timesteps, (n,), generator=generator, device=device)
            return torch.multinomial(self.probabilities, n, replacement=True, generator=generator)
        offset = torch.rand((), generator=generator, device=device, dtype=torch.float64)
        quantiles = (offset + torch.arange(n, device=device, dtype=torch.float64)) / n
        if self.cdf is None:  # F⁻¹(q) = ⌊q·T⌋
            t = (quantiles * self.timesteps).floor().long()
        else:
            t = torch.searchsorted(self.cdf, quantiles, right=True)
        return t.clamp(max=self.timesteps - 1)  # q can round up to 1 when u is within 2⁻⁵³ of 1


def loss_weights(schedule: NoiseSchedule, prediction: str, weighting: str = "none", *,
                 min_snr_gamma: float = 5.0) -> torch.Tensor:
    """w(t), the factor on ‖target − output‖² for the network's `prediction` ("eps", "x0" or "v").

    none: 1 (L_simple, Ho et al. 2020, eq. 14, whatever the target).
    min_snr: Min-SNR-γ (Hang et al. 2023, eq. 8): the x̂0 error is weighted by min(SNR, γ). Since
    ‖x0 − x̂0‖² = ‖ε − ε̂‖²/SNR = ‖v − v̂‖²/(SNR + 1), that is min(SNR, γ)/SNR on the ε error,
    min(SNR, γ) on the x0 error and min(SNR, γ)/(SNR + 1) on the v error.
    """
    if weighting == "none":
        return torch.ones(schedule.timesteps, dtype=torch.float64)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")
    if not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
    snr = schedule.alpha_bars / (1.0 - schedule.alpha_bars)
    x0_weight = snr.clamp(max=min_snr_gamma)
    per_x0_error = {"eps": 1.0 / snr, "x0": torch.ones_like(snr), "v": 1.0 / (snr + 1.0)}
    if prediction not in per_x0_error:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(per_x0_error)}")
    return x0_weight * per_x0_error[prediction]
