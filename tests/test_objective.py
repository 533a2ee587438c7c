"""The training objective's weightings against closed forms and independent computations: where t is
drawn (noise_levels.timestep_probabilities), how each t's error counts (loss_weights, checked through
the Denoiser for every parameterisation), the power-function EMA and the learning-rate schedule."""

import math

import pytest
import torch

from diffusion_core import EMA, NoiseSchedule
from diffusion_core.denoiser import Denoiser, predict_x0
from diffusion_core.ema import power_ema_exponent
from diffusion_core.noise_levels import TimestepDraw, loss_weights, timestep_probabilities
from diffusion_core.train import learning_rate


@pytest.fixture(scope="module", params=["linear", "cosine"])
def schedule(request):
    return NoiseSchedule(1000, request.param)


def test_uniform_noise_levels(schedule):
    p = timestep_probabilities(schedule, "uniform")
    assert torch.equal(p, torch.full((1000,), 1e-3, dtype=torch.float64))


@pytest.mark.parametrize("mean,std", [(2.4, 2.4), (-1.0, 1.5)])
def test_log_snr_normal_matches_nearest_level_of_normal_draws(schedule, mean, std):
    """Independent computation: draw λ ~ N(mean, std²), give each draw the t whose λ_t is nearest;
    the histogram must match p(t) (max deviation within 5 binomial standard errors, and the mean t)."""
    p = timestep_probabilities(schedule, "log_snr_normal", log_snr_mean=mean, log_snr_std=std)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12) and (p >= 0).all()
    n = 400_000
    draws = mean + std * torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lam = schedule.log_snr
    nearest = torch.searchsorted(-lam, -draws).clamp(1, len(lam) - 1)  # -λ ascends
    left_closer = (draws - lam[nearest - 1]).abs() <= (draws - lam[nearest]).abs()
    nearest = torch.where(left_closer, nearest - 1, nearest)
    histogram = torch.bincount(nearest, minlength=len(lam)).double() / n
    standard_error = (p * (1 - p) / n).sqrt().clamp(min=1 / n)
    assert ((histogram - p).abs() / standard_error).max() < 5
    t = torch.arange(len(lam), dtype=torch.float64)
    assert (p * t).sum().item() == pytest.approx((histogram * t).sum().item(), abs=2.0)


def test_log_snr_normal_puts_mass_where_asked():
    """λ ~ N(2.4, 2.4²) on the linear schedule: P(λ < −5) is about Φ(−3.08) ≈ 0.1 %, against about
    30 % for uniform t (the noise tail the uniform draw wastes)."""
    schedule = NoiseSchedule(1000, "linear")
    tail = schedule.log_snr < -5
    assert timestep_probabilities(schedule, "uniform")[tail].sum() > 0.25
    expected = 0.5 * math.erfc((2.4 + 5) / 2.4 / math.sqrt(2))
    assert timestep_probabilities(schedule, "log_snr_normal")[tail].sum().item() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("distribution", ["uniform", "log_snr_normal"])
def test_stratified_draws_hold_one_level_per_share_of_mass(schedule, distribution):
    """The low-discrepancy property, checked against the CDF F of p(t) computed here: in every batch of n,
    #{t_i ≤ k} is within 1 of n·F(k) for every k (independent draws of 64 miss this by ~8), and over many
    batches each t still comes up with probability p(t) (within 5 binomial standard errors)."""
    p = timestep_probabilities(schedule, distribution)
    table = None if distribution == "uniform" else p.float()
    cdf = torch.cumsum(p, 0)
    n, batches = 64, 3000
    rng = torch.Generator().manual_seed(0)
    stratified, independent = TimestepDraw(table, 1000, stratified=True), TimestepDraw(table, 1000)
    draws = torch.stack([stratified(n, rng) for _ in range(batches)])
    assert draws.dtype == torch.long and draws.min() >= 0 and draws.max() <= 999
    levels = torch.arange(1000).expand(batches, 1000).contiguous()
    at_or_below = torch.searchsorted(draws.sort(1).values, levels, right=True).double()  # [batch, k]: #{t_i ≤ k}
    assert (at_or_below - n * cdf).abs().max().item() <= 1 + 1e-6
    histogram = torch.bincount(draws.flatten(), minlength=1000).double() / draws.numel()
    standard_error = (p * (1 - p) / draws.numel()).sqrt().clamp(min=1 / draws.numel())
    assert ((histogram - p).abs() / standard_error).max() < 5
    independent_draws = torch.stack([independent(n, rng) for _ in range(200)]).sort(1).values
    assert (torch.searchsorted(independent_draws, levels[:200], right=True) - n * cdf).abs().max() > 3


class RandomNet(torch.nn.Module):
    """Any fixed network output: the check must hold for wrong predictions too."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x_t, t, **cond):
        return self.out


def per_image_loss(schedule, prediction, out, x0, t, noise, **weighting):
    """The Denoiser's loss of each image alone, for a network that outputs `out`."""
    return torch.stack([Denoiser(RandomNet(out[i:i + 1]), schedule, prediction, **weighting).double()
                        .loss(x0[i:i + 1], t[i:i + 1], noise[i:i + 1]) for i in range(len(t))]).double()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_is_min_snr_gamma_times_the_x0_error(schedule, prediction):
    """Whatever the network predicts, Min-SNR-γ's loss is min(SNR, γ)·‖x0 − x̂0‖² with x̂0 the
    denoiser's own estimate (Hang et al. 2023, eq. 8), and no weighting is L_simple on the target."""
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 1, 5, 40, 200, 201, 500, 800, 990, 999])
    x0 = torch.rand(len(t), 1, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    out = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    weighted = Denoiser(RandomNet(out), schedule, prediction)
    x_t = schedule.sqrt_alpha_bars[t].view(-1, 1, 1, 1) * x0 + schedule.sqrt_one_minus_alpha_bars[t].view(-1, 1, 1, 1) * noise
    x0_hat = predict_x0(schedule, x_t, t, weighted(x_t, t))
    snr = schedule.alpha_bars[t] / (1 - schedule.alpha_bars[t])
    expected = snr.clamp(max=5.0) * ((x0 - x0_hat) ** 2).flatten(1).mean(1)
    min_snr = per_image_loss(schedule, prediction, out, x0, t, noise, loss_weighting="min_snr", min_snr_gamma=5.0)
    assert torch.allclose(min_snr, expected, rtol=1e-5, atol=0)

    simple = ((out - weighted.target(x0, t, noise)) ** 2).flatten(1).mean(1)
    assert torch.allclose(per_image_loss(schedule, prediction, out, x0, t, noise), simple, rtol=1e-5, atol=0)


@pytest.mark.parametrize("weighting", ["none", "min_snr"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_weighted_loss_is_minimal_at_the_gaussian_optimum(prediction, weighting):
    """For Gaussian data x0 ~ N(μ, s²) the optimal ε̂ is known in closed form; expressed as each
    parameterisation's output, it minimises every weighting: shifting it either way raises the loss."""
    schedule = NoiseSchedule(1000, "linear")
    mu, s = 0.2, 0.25
    gen = torch.Generator().manual_seed(2)
    n = 20_000
    t = torch.randint(0, 1000, (n,), generator=gen)
    x0 = mu + s * torch.randn(n, 1, 1, 1, generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    ab = schedule.alpha_bars[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    eps_opt = (1 - ab).sqrt() * (x_t - ab.sqrt() * mu) / (ab * s * s + 1 - ab)
    x0_opt = (x_t - (1 - ab).sqrt() * eps_opt) / ab.sqrt()
    optimum = {"eps": eps_opt, "x0": x0_opt, "v": ab.sqrt() * eps_opt - (1 - ab).sqrt() * x0_opt}[prediction]

    def loss(shift: float) -> float:
        denoiser = Denoiser(RandomNet(optimum + shift), schedule, prediction, loss_weighting=weighting).double()
        return denoiser.loss(x0, t, noise).item()

    at_optimum = loss(0.0)
    assert loss(0.05) > at_optimum and loss(-0.05) > at_optimum


def test_power_ema_exponent_matches_edm2():
    """σ_rel = 0.10 ↔ γ = 6.94 and 0.05 ↔ 16.97 (Karras et al. 2024, Sec. 3.1)."""
    assert power_ema_exponent(0.10) == pytest.approx(6.94, abs=0.005)
    assert power_ema_exponent(0.05) == pytest.approx(16.97, abs=0.005)
    with pytest.raises(ValueError, match="relative std"):
        power_ema_exponent(0.5)


def test_power_ema_weights_are_the_closed_form():
    """After n updates with d_k = (1 − 1/k)^(γ+1), θ_ema = Σ_k w_k θ_k with
    w_k = (k^(γ+1) − (k−1)^(γ+1)) / n^(γ+1) (the product of the decays telescopes); the profile of
    w over k/n has relative standard deviation σ_rel (EDM2, eq. 3)."""
    std = 0.10
    param = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    model = torch.nn.Module()
    model.p = param
    ema = EMA(model, decay=0.999, std=std)
    n = 3000
    thetas = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for value in thetas:
        param.data.fill_(value)
        ema.update(model)
    g1 = power_ema_exponent(std) + 1
    k = torch.arange(1, n + 1, dtype=torch.float64)
    w = (k**g1 - (k - 1) ** g1) / n**g1
    assert ema.model.p.item() == pytest.approx((w * thetas).sum().item(), rel=1e-9, abs=1e-12)
    where = k / n
    mean = (w * where).sum()
    assert ((w * (where - mean) ** 2).sum().sqrt()).item() == pytest.approx(std, rel=0.01)


def test_fixed_ema_keeps_its_warm_up():
    model = torch.nn.Linear(1, 1)
    ema = EMA(model, decay=0.995)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0)/(10 + 0)
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.995


def test_cosine_learning_rate():
    """Warm-up to the peak, then peak·½(1 + cos(π·progress)): half the peak halfway, 0 at the end."""
    peak, warmup, total = 2.0, 10, 110
    assert learning_rate(4, peak, warmup, total, "cosine") == pytest.approx(1.0)
    assert learning_rate(10, peak, warmup, total, "cosine") == pytest.approx(peak)
    assert learning_rate(60, peak, warmup, total, "cosine") == pytest.approx(peak / 2)
    assert learning_rate(85, peak, warmup, total, "cosine") == pytest.approx(peak * 0.5 * (1 + math.cos(0.75 * math.pi)))
    assert learning_rate(110, peak, warmup, total, "cosine") == pytest.approx(0.0, abs=1e-12)
    rates = [learning_rate(s, peak, warmup, total, "cosine") for s in range(warmup, total)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert learning_rate(60, peak, warmup, total, "none") == peak


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a_large_batch_without_gradients_runs_in_passes_of_the_cap_with_each_images_own_conditions(prediction,
                                                                                                   monkeypatch):
    """Independent computation: each image through the network alone. A batch of 70 goes through in passes of at
    most CPU_IMAGES_PER_PASS (32 here: two full slices and a partial one), and each image keeps its own t, class and
    x0 estimate (a slice offset by one index would hand an image a neighbour's class); with gradients, one pass."""
    from diffusion_core import denoiser as denoiser_module
    from diffusion_core.unet import UNet

    monkeypatch.setattr(denoiser_module, "CPU_IMAGES_PER_PASS", 32)
    torch.manual_seed(0)
    net = UNet(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(), num_classes=10,
               self_condition=True).double()
    for parameter in net.parameters():  # away from the zero-initialised output layer, so every input matters
        parameter.data.normal_(0, 0.2)
    model = Denoiser(net, NoiseSchedule(100, "linear"), prediction).double().eval()
    n = 70
    x, estimate = torch.randn(n, 1, 28, 28, dtype=torch.float64), torch.randn(n, 1, 28, 28, dtype=torch.float64)
    t, labels = torch.randint(0, 100, (n,)), torch.randint(0, 11, (n,))
    passes: list[int] = []
    net.register_forward_hook(lambda module, args, output: passes.append(len(args[0])))
    with torch.no_grad():
        alone = torch.cat([model(x[i:i + 1], t[i:i + 1], class_labels=labels[i:i + 1], x0_estimate=estimate[i:i + 1])
                           for i in range(n)])
        passes.clear()
        sliced = model(x, t, class_labels=labels, x0_estimate=estimate)
    assert passes == [32, 32, 6]
    torch.testing.assert_close(sliced, alone, rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # conditions left as None (no class: the null token; no estimate yet: zeros) stay None
        alone = torch.cat([model(x[i:i + 1], t[i:i + 1], class_labels=None, x0_estimate=None) for i in range(n)])
        torch.testing.assert_close(model(x, t, class_labels=None, x0_estimate=None), alone, rtol=1e-9, atol=1e-9)
    passes.clear()
    model(x, t, class_labels=labels, x0_estimate=estimate)  # with gradients (training): one pass
    assert passes == [n]
