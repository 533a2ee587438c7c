"""Consistency and progressive distillation and their samplers against exact answers.

- Gaussian data x0 ~ N(μ, s²) per pixel: the probability-flow ODE keeps the standardised value, so its end
  from x_t is f(x_t, t) = μ + s·(x_t − √ᾱ·μ)/√(ᾱ·s² + 1 − ᾱ) (the exact consistency function). Sampling
  with it must give N(μ, s²) at any number of steps; the posterior mean in its place must not.
- Data that is one image x*: the exact teacher's DDIM step lands exactly on the ODE (x_t' = √ᾱ'·x* +
  √(1−ᾱ')·ε with the same ε) and f = x* everywhere, so the distillation loss of the exact student is 0, and
  a student off by δ scores δ² exactly on the terms that reach clean data (the boundary f(x, −1) = x).
  Progressive distillation's two-step target x̃ is x* itself there, so an exact student scores 0 everywhere.
- The teacher's ODE step against the exact ODE of Gaussian data (its solution keeps the standardised value, as
  above): the error of one step shrinks as h² for DDIM and as h³ for the second-order step (local errors O(h²)
  and O(h³)), measured at three noise levels from steps of 0.5 and 0.25 in log SNR, and with the intermediate
  evaluation a third of the way instead of halfway (its weight 1/(2r) must follow it).
- Progressive distillation's x̃ is checked against its definition with DDIM steps written out here
  (Song et al. 2021, eq. 12) on the Gaussian data's posterior-mean teacher: one step with x̂0 = x̃ lands where
  two of the teacher's do.
ᾱ comes from the tests' own table (linear β from 1e-4 to 0.02, Ho et al. §4), not the library's.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffusion_core import NoiseSchedule
from diffusion_core import distill as distill_module
from diffusion_core.config import ConfigError, load_config
from diffusion_core.denoiser import Denoiser
from diffusion_core.distill import (Bf16Passes, GuidedTeacher, cleaner_level, consistency_distillation_loss,
                                    halving_stages, level_probabilities, progressive_distillation_loss, student_config,
                                    student_level_probabilities, teacher_ode_step, teacher_passes_in_bf16,
                                    two_step_target)
from diffusion_core.guidance import guided_eps
from diffusion_core.samplers import few_step_levels, sample, sampling_timesteps

T = 1000
MU, S = 0.2, 0.25


def paper_alpha_bars(timesteps: int = T) -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64), 0)


class GaussianEps(nn.Module):
    """ε̂ of an x̂0 rule for N(μ, s²) data: the ODE's end (`ode_end`) or the posterior mean."""

    def __init__(self, ode_end: bool) -> None:
        super().__init__()
        self.alpha_bars = paper_alpha_bars()
        self.ode_end = ode_end

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bars[t].view(-1, 1, 1, 1).to(x.dtype)
        variance = ab * S**2 + 1 - ab
        if self.ode_end:
            x0 = MU + S * (x - ab.sqrt() * MU) / variance.sqrt()
        else:
            x0 = MU + ab.sqrt() * S**2 / variance * (x - ab.sqrt() * MU)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()


@pytest.mark.parametrize("steps, levels_log_snr", [(1, ()), (2, ()), (4, ()), (4, (-4.5, -1.5, 0.5))])
def test_consistency_sampler_draws_the_data_distribution_with_the_exact_consistency_function(steps, levels_log_snr):
    schedule = NoiseSchedule(T, "linear")
    shape = (4000, 1, 4, 4)
    exact = sample(GaussianEps(ode_end=True), schedule, shape, sampler="consistency", steps=steps,
                   levels_log_snr=levels_log_snr, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    # 64,000 draws: the mean's standard error is 0.001, the std's 0.0007
    assert abs(exact.mean().item() - MU) < 0.006
    assert exact.std().item() == pytest.approx(S, rel=0.02)
    # the posterior mean in its place (an ordinary ε-model) shrinks the spread: the check can tell
    blurred = sample(GaussianEps(ode_end=False), schedule, shape, sampler="consistency", steps=steps,
                     levels_log_snr=levels_log_snr, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    assert blurred.std().item() < 0.9 * S


def test_few_step_levels_are_the_first_steps_of_the_log_snr_grid():
    schedule = NoiseSchedule(T, "linear")
    assert few_step_levels(schedule, 4) == sampling_timesteps(schedule, 5, "log_snr")[:4]
    assert few_step_levels(schedule, 1) == [T - 1]
    with pytest.raises(ValueError, match="few-step sampler"):
        few_step_levels(schedule, T)


def log_snr_at(t: int) -> float:
    """λ_t = log(ᾱ_t / (1 − ᾱ_t)) of the paper's linear schedule, computed here from its β's."""
    alpha_bar = paper_alpha_bars()[t]
    return float((alpha_bar / (1 - alpha_bar)).log())


def test_levels_given_in_log_snr_are_the_nearest_timesteps_after_the_first():
    schedule = NoiseSchedule(T, "linear")
    chosen = [666, 407, 213]
    assert few_step_levels(schedule, 4, levels_log_snr=tuple(log_snr_at(t) for t in chosen)) == [T - 1, *chosen]
    halfway = 0.5 * (log_snr_at(500) + log_snr_at(499))  # nearest: 500 just above the midpoint, 499 just below
    assert few_step_levels(schedule, 2, levels_log_snr=(halfway + 1e-6,)) == [T - 1, 499]
    assert few_step_levels(schedule, 2, levels_log_snr=(halfway - 1e-6,)) == [T - 1, 500]
    with pytest.raises(ValueError, match="2 levels_log_snr for 4 steps"):
        few_step_levels(schedule, 4, levels_log_snr=(-2.0, 0.0))
    with pytest.raises(ValueError, match="each level must be cleaner than the one before"):
        few_step_levels(schedule, 3, levels_log_snr=(0.0, -2.0))
    with pytest.raises(ValueError, match="each level must be cleaner than the one before"):
        few_step_levels(schedule, 2, levels_log_snr=(-30.0,))  # below λ at T−1: lands on T−1 itself


def test_consistency_sampler_visits_the_levels_it_is_given():
    model = RecordingEps()
    levels = (log_snr_at(700), log_snr_at(350), log_snr_at(100))
    sample(model, NoiseSchedule(T, "linear"), (2, 1, 2, 2), sampler="consistency", steps=4, levels_log_snr=levels,
           generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert model.asked == [T - 1, 700, 350, 100]
    with pytest.raises(ValueError, match="levels_log_snr is a setting of the consistency sampler, not of 'progressive'"):
        sample(model, NoiseSchedule(T, "linear"), (2, 1, 2, 2), sampler="progressive", steps=4, levels_log_snr=levels)


class RecordingEps(nn.Module):
    """ε̂ = 0 (so DDIM's x̂0 is x_t/√ᾱ, clipped), recording the timesteps it is asked at."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.asked.append(int(t[0]))
        return torch.zeros_like(x)


@pytest.mark.parametrize("steps", [1, 4])
def test_progressive_sampler_is_ddim_on_the_few_step_levels(steps):
    """One evaluation per level of few_step_levels, then the step to clean data: with ε̂ = 0 every DDIM step
    is x' = √(ᾱ'/ᾱ)·x while x̂0 = x/√ᾱ stays in [−1, 1], and the last returns x̂0."""
    schedule = NoiseSchedule(T, "linear")
    model = RecordingEps()
    x_T = torch.full((2, 1, 2, 2), 0.004, dtype=torch.float64)  # x̂0 = 0.004/√ᾱ_999 ≈ 0.63: never clipped
    out = sample(model, schedule, x_T.shape, sampler="progressive", steps=steps, x_T=x_T, dtype=torch.float64)
    assert model.asked == few_step_levels(schedule, steps)
    assert torch.allclose(out, x_T / paper_alpha_bars()[T - 1].sqrt(), rtol=1e-9)


def test_cleaner_level_is_the_noisiest_timestep_at_least_the_step_cleaner():
    schedule = NoiseSchedule(T, "linear")
    log_snr = paper_alpha_bars().log() - (-paper_alpha_bars()).log1p()
    step = 0.6
    t = torch.arange(T)
    got = cleaner_level(schedule, t, step)
    for ti, gi in zip(t.tolist(), got.tolist()):
        wanted = float(log_snr[ti]) + step
        expected = max([s for s in range(T) if float(log_snr[s]) >= wanted - 1e-9], default=-1)
        assert gi == expected, ti
        assert gi < ti


def test_noise_levels_are_drawn_even_in_log_snr():
    schedule = NoiseSchedule(T, "linear")
    p = level_probabilities(schedule)
    log_snr = paper_alpha_bars().log() - (-paper_alpha_bars()).log1p()
    assert float(p.sum()) == pytest.approx(float(log_snr[0] - log_snr[-1]), rel=1e-6)
    # mass of the timesteps in the noisier half of the λ range is half the total
    middle = 0.5 * float(log_snr[0] + log_snr[-1])
    noisy = float(p[log_snr < middle].sum()) / float(p.sum())
    assert noisy == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("chosen", [[666, 407, 213], []])  # [] : the sampler's default levels, even in log SNR
@pytest.mark.parametrize("focus", [0.0, 0.25, 0.6])
def test_a_share_of_the_noise_levels_is_drawn_at_the_samplers_own_levels(focus, chosen):
    schedule = NoiseSchedule(T, "linear")
    levels = {"distill.level_focus": focus, "distill.sample_steps": 4,
              "distill.sample_levels_log_snr": [log_snr_at(t) for t in chosen]}
    cfg = student_config(load_config("mnist-cpu-cond"), levels).distill
    visited = [T - 1, *chosen] if chosen else sampling_timesteps(schedule, 5, "log_snr")[:4]  # where it samples
    weights = student_level_probabilities(schedule, cfg).double()
    p = weights / weights.sum()
    even = level_probabilities(schedule).double()
    if focus == 0:
        assert torch.equal(weights, even)  # the draw of runs without a focus, unchanged
    extra = p - (1 - focus) * even / even.sum()  # what the focus adds on top of the even share
    assert extra[visited].tolist() == pytest.approx([focus / 4] * 4, abs=1e-7)
    extra[visited] = 0
    assert float(extra.abs().max()) < 1e-7
    with pytest.raises(ConfigError, match=r"distill.level_focus must be in \[0, 1\)"):
        student_config(load_config("smoke"), ["distill.level_focus=1"])
    with pytest.raises(ConfigError, match="distill.level_focus=0.5 with progressive distillation"):
        student_config(load_config("smoke"), ["distill.method=progressive", "distill.ode_steps=16",
                                              "distill.level_focus=0.5"])


class OneImageNet(nn.Module):
    """The exact network output for data that is the single image x* (+ δ: a wrong student)."""

    def __init__(self, image: torch.Tensor, prediction: str, offset: float = 0.0) -> None:
        super().__init__()
        self.alpha_bars = paper_alpha_bars()
        self.image, self.prediction, self.offset = image, prediction, offset

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        ab = self.alpha_bars[t].view(-1, 1, 1, 1).to(x.dtype)
        x0 = self.image + self.offset
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return eps if self.prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0


def snr_weight(t: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(t) of the distillation losses from the tests' own ᾱ table."""
    ab = paper_alpha_bars()[t]
    snr = ab / (1 - ab)
    return {"none": torch.ones_like(ab), "min_snr": snr.clamp(max=1.0), "truncated_snr": snr.clamp(min=1.0)}[weighting]


def per_image_distance(squared_error: torch.Tensor, metric: str) -> torch.Tensor:
    """The losses' distance of a weighted mean squared error e²: e² itself, or pseudo-Huber √(e² + c²) − c with
    Song & Dhariwal's (2023) c = 0.00054·√D over D pixels, here per pixel (their distance divided by √D)."""
    c = 0.00054
    return squared_error if metric == "l2" else (squared_error + c * c).sqrt() - c


@pytest.mark.parametrize("metric", ["l2", "pseudo_huber"])
@pytest.mark.parametrize("weighting", ["none", "min_snr", "truncated_snr"])
@pytest.mark.parametrize("prediction", ["v", "eps"])
@pytest.mark.parametrize("delta", [0.0, 0.1])
def test_distillation_loss_of_the_exact_student_is_zero_and_the_boundary_is_exact(delta, prediction, weighting,
                                                                                   metric):
    schedule = NoiseSchedule(T, "linear")
    image = torch.linspace(-0.9, 0.8, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    x0 = image.expand(512, -1, -1, -1)
    generator = torch.Generator().manual_seed(0)
    t = torch.randint(0, T, (512,), generator=generator)
    t[:32] = torch.arange(32)  # the cleanest levels, some of whose steps reach clean data
    t_next = cleaner_level(schedule, t, 0.6)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    teacher = Denoiser(OneImageNet(image, "eps"), schedule, "eps").double()
    student = Denoiser(OneImageNet(image, prediction, delta), schedule, prediction).double()
    target = Denoiser(OneImageNet(image, prediction, delta), schedule, prediction).double()
    loss = consistency_distillation_loss(student, target, teacher, x0, t, t_next, noise, weighting, metric=metric)
    # the target is δ off too, except where t' = −1: there it is the teacher's step itself, x*
    reaches_clean = (t_next < 0).double()
    assert 0 < float(reaches_clean.mean()) < 0.2
    expected = per_image_distance(snr_weight(t, weighting) * delta**2 * reaches_clean, metric).mean()
    assert loss.item() == pytest.approx(float(expected), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("metric", ["l2", "pseudo_huber"])
@pytest.mark.parametrize("weighting", ["none", "min_snr", "truncated_snr"])
@pytest.mark.parametrize("prediction", ["v", "eps"])
@pytest.mark.parametrize("delta", [0.0, 0.1])
def test_progressive_loss_of_the_exact_student_is_zero_and_off_by_delta_is_delta_squared(delta, prediction,
                                                                                         weighting, metric):
    """Data that is one image x*: the exact teacher's two DDIM steps stay on the ODE, so x̃ = x* at every level;
    a student whose x̂0 is x* + δ scores w(t)·δ², or its pseudo-Huber distance."""
    schedule = NoiseSchedule(T, "linear")
    image = torch.linspace(-0.9, 0.8, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    x0 = image.expand(256, -1, -1, -1)
    generator = torch.Generator().manual_seed(1)
    t = torch.randint(2, T, (256,), generator=generator)
    t_mid = (t * torch.rand(256, generator=generator, dtype=torch.float64)).long().clamp(min=1)
    t_next = (t_mid * torch.rand(256, generator=generator, dtype=torch.float64)).long() - 1  # −1 … t_mid − 1
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    teacher = Denoiser(OneImageNet(image, "eps"), schedule, "eps").double()
    student = Denoiser(OneImageNet(image, prediction, delta), schedule, prediction).double()
    loss = progressive_distillation_loss(student, teacher, x0, t, t_mid, t_next, noise, weighting, metric)
    expected = per_image_distance(snr_weight(t, weighting) * delta**2, metric).mean()
    assert loss.item() == pytest.approx(float(expected), rel=1e-6, abs=1e-12)


class ClassImagesNet(nn.Module):
    """The exact ε̂ for data that is the single image `images[k]` in class k; the last row is the "no class" label's."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.alpha_bars, self.images = paper_alpha_bars(), images
        self.config = SimpleNamespace(num_classes=len(images) - 1)  # what guidance reads, as from a U-Net

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bars[t].view(-1, 1, 1, 1).to(x.dtype)
        return (x - ab.sqrt() * self.images[class_labels]) / (1 - ab).sqrt()


@pytest.mark.parametrize("guidance", [0.0, 0.5, 2.0])
def test_a_guided_teacher_teaches_its_guided_ode(guidance):
    """Teacher: one image x*_k per class k and x*_∅ for "no class". Its guided ε̂, (1 + w)·ε̂_k − w·ε̂_∅, is the ε̂ of
    the one image x̃_k = (1 + w)·x*_k − w·x*_∅ (ε̂ is linear in the image), whose DDIM steps stay on that image's
    straight path. So the student that draws x̃_k (x*_∅ where the label was dropped) scores 0 in both distillations,
    and the student of the unguided teacher scores w²·mean((x*_k − x*_∅)²) on every labelled image."""
    schedule = NoiseSchedule(T, "linear")
    pixels = torch.linspace(-0.25, 0.25, 16, dtype=torch.float64).reshape(1, 4, 4)
    images = torch.stack([pixels, pixels.flip(-1), 0.05 * pixels.flip(-2)])  # classes 0 and 1, then ∅
    guided_images = torch.stack([(1 + guidance) * images[k] - guidance * images[2] for k in (0, 1)] + [images[2]])
    assert guided_images.abs().max() < 1  # the teacher's x̂0 clip at ±1 stays out of the way
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(300) % 3
    x0 = images[labels]
    t = torch.randint(1, T, (300,), generator=generator)
    t_mid = (t * torch.rand(300, generator=generator, dtype=torch.float64)).long()
    t_next = torch.where(t % 2 == 0, -1, t_mid // 2)  # half the steps reach clean data
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    teacher = GuidedTeacher(Denoiser(ClassImagesNet(images), schedule, "eps").double(), guidance)
    exact = Denoiser(ClassImagesNet(guided_images), schedule, "eps").double()
    unguided = Denoiser(ClassImagesNet(images), schedule, "eps").double()
    cond = {"class_labels": labels}
    assert progressive_distillation_loss(exact, teacher, x0, t, t_mid, t_next, noise, **cond).item() < 1e-18
    assert consistency_distillation_loss(exact, exact, teacher, x0, t, t_next, noise, **cond).item() < 1e-18
    off = [guidance**2 * float(((images[k] - images[2]) ** 2).mean()) if k < 2 else 0.0 for k in labels.tolist()]
    assert progressive_distillation_loss(unguided, teacher, x0, t, t_mid, t_next, noise, **cond).item() == \
        pytest.approx(sum(off) / len(off), rel=1e-6, abs=1e-18)  # the loss is summed in float32


def test_distillation_guidance_needs_a_guidable_teacher():
    conditional = load_config("smoke", ["model.num_classes=10", "sample.guidance=2"])
    student = student_config(conditional, ["distill.guidance=1.5"])
    assert student.distill.guidance == 1.5  # its guidance is in its weights: none on top, none swept
    assert (student.sample.guidance, student.sample.guidance_sweep) == (0.0, ())
    assert student_config(conditional).sample.guidance == 2.0  # an unguided student keeps its teacher's
    with pytest.raises(ConfigError, match="distill.guidance must be >= 0"):
        student_config(conditional, ["distill.guidance=-1"])
    for teacher in (load_config("smoke"), load_config("smoke", ["model.num_classes=10", "train.label_dropout=0",
                                                                 "sample.guidance_sweep=[]"])):
        with pytest.raises(ConfigError, match="distill.guidance=1.0 needs a class-conditional teacher trained with"):
            student_config(teacher, ["distill.guidance=1"])
    never_dropped = load_config("smoke", ["model.num_classes=10", "train.label_dropout=0", "sample.guidance_sweep=[]"])
    with pytest.raises(ConfigError, match="distill.guidance=1.0 needs a class-conditional teacher"):  # its training
        student_config(never_dropped, ["train.label_dropout=0.1", "distill.guidance=1"])


def test_bf16_passes_run_the_network_in_bf16_and_hand_back_float32():
    from diffusion_core.checkpoint import build_denoiser

    torch.manual_seed(0)
    config = load_config("smoke", ["model.num_classes=10"])
    denoiser = build_denoiser(config).eval()
    with torch.no_grad():  # a trained-looking network: its output layer starts at zero
        for parameter in denoiser.net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    x, t, labels = torch.randn(4, 1, 28, 28), torch.tensor([0, 30, 60, 99]), torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        exact = denoiser(x, t, class_labels=labels)
        passes = Bf16Passes(denoiser)
        out = passes(x, t, class_labels=labels)
        guided = GuidedTeacher(passes, 0.5)(x, t, class_labels=labels)  # through guidance: its class count is read
    assert out.dtype == guided.dtype == torch.float32
    assert torch.equal(out, out.bfloat16().float())  # the ε head's output came out of bf16 (fp32 values are not)
    assert not torch.equal(out, exact)
    assert float((out - exact).abs().max()) < 0.02 * float(exact.abs().max())  # the same network, to bf16's precision
    both = passes(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([labels, torch.full_like(labels, 10)]))
    assert torch.equal(guided, 1.5 * both[:4] - 0.5 * both[4:])  # (1 + w)·ε̂(c) − w·ε̂(∅), in float32
    assert passes.schedule is denoiser.schedule and passes.net is denoiser.net


def test_teacher_precision_auto_is_bf16_on_cpus_with_native_bf16_only(monkeypatch):
    from pathlib import Path

    from diffusion_core.runtime import fast_bf16_cpu

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux says which CPU flags it has: AMX's tiles are "amx_tile", AVX512's bf16 "avx512_bf16"
        flags = set(cpuinfo.read_text().split())
        assert fast_bf16_cpu() == bool(flags & {"amx_tile", "avx512_bf16"})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(distill_module, "fast_bf16_cpu", lambda: native)
        assert [teacher_passes_in_bf16(p, cpu) for p in ("fp32", "bf16", "auto")] == [False, True, native]
        assert [teacher_passes_in_bf16(p, cuda) for p in ("fp32", "bf16", "auto")] == [False, True, False]
    with pytest.raises(ConfigError, match="distill.teacher_precision='fp16' is unknown"):
        student_config(load_config("smoke"), ["distill.teacher_precision=fp16"])


def ddim_step(x: torch.Tensor, t: int, t_next: int, x0: torch.Tensor) -> torch.Tensor:
    """Song et al. 2021, eq. 12 with σ = 0, from t to t_next (−1: clean data, ᾱ = 1), written out here."""
    ab = paper_alpha_bars()
    a, a_next = ab[t], (ab[t_next] if t_next >= 0 else torch.tensor(1.0, dtype=torch.float64))
    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


def third_of_the_way(schedule: NoiseSchedule, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """The timestep nearest a third of the way in log SNR from t to t_next: r ≈ 1/3 in place of ≈ 1/2."""
    log_snr = schedule.log_snr
    wanted = log_snr[t] + (log_snr[t_next] - log_snr[t]) / 3
    return (log_snr[None, :] - wanted[:, None]).abs().argmin(dim=1)


@pytest.mark.parametrize("t", [900, 600, 300])
@pytest.mark.parametrize("order, rate, midpoint", [(1, 2, "halfway"), (2, 3, "halfway"), (2, 3, "a third")])
def test_teacher_ode_step_error_shrinks_as_its_order_says(t, order, rate, midpoint, monkeypatch):
    if midpoint == "a third":  # D = (1 − 1/(2r))·x̂0 + x̂0_mid/(2r) must weigh the first evaluation in as well
        monkeypatch.setattr(distill_module, "midway_level", third_of_the_way)
    schedule = NoiseSchedule(T, "linear")
    teacher = Denoiser(GaussianEps(ode_end=False), schedule, "eps").double()  # the posterior mean: the exact ε̂
    ab = paper_alpha_bars()
    log_snr = (ab / (1 - ab)).log()
    x_t = MU * ab[t].sqrt() + (ab[t] * S**2 + 1 - ab[t]).sqrt() * torch.randn(256, 1, 4, 4, dtype=torch.float64,
                                                                             generator=torch.Generator().manual_seed(t))
    steps, errors = [], []
    for wanted in (0.5, 0.25):
        t_next = int((log_snr - (log_snr[t] + wanted)).abs().argmin())
        a, a_next = ab[t], ab[t_next]
        exact = a_next.sqrt() * MU + ((a_next * S**2 + 1 - a_next) / (a * S**2 + 1 - a)).sqrt() * (x_t - a.sqrt() * MU)
        step = teacher_ode_step(teacher, x_t, torch.full((256,), t), torch.full((256,), t_next), order)
        steps.append(float(log_snr[t_next] - log_snr[t]))
        errors.append(float((step - exact).abs().max()))
    observed = math.log(errors[0] / errors[1]) / math.log(steps[0] / steps[1])
    assert observed == pytest.approx(rate, abs=0.3)  # halving h: 4× (DDIM) or 8× (second order) less error


@pytest.mark.parametrize("order", [1, 2])
def test_teacher_ode_step_to_clean_data_is_the_teachers_x0(order):
    schedule = NoiseSchedule(T, "linear")
    gaussian = GaussianEps(ode_end=False)
    teacher = Denoiser(gaussian, schedule, "eps").double()
    t, t_next = torch.tensor([5, 5, 3, 3, 0, 0, 40, 40]), torch.tensor([-1, 2, -1, 1, -1, -1, -1, 20])
    ab = paper_alpha_bars()[t].view(-1, 1, 1, 1)  # x_t from its marginal, whose x̂0 stays inside the clip at ±1
    x_t = MU * ab.sqrt() + (ab * S**2 + 1 - ab).sqrt() * torch.randn(8, 1, 4, 4, dtype=torch.float64,
                                                                     generator=torch.Generator().manual_seed(1))
    step = teacher_ode_step(teacher, x_t, t, t_next, order)
    x0 = (x_t - (1 - ab).sqrt() * gaussian(x_t, t)) / ab.sqrt()
    clean = t_next < 0
    assert torch.allclose(step[clean], x0[clean], atol=1e-12)
    assert ((step[~clean] - x0[~clean]).flatten(1).abs().amax(1) > 1e-3).all()  # the others stop short of it
    for i in (~clean).nonzero().flatten().tolist():  # and each is its own step, taken alone
        alone = teacher_ode_step(teacher, x_t[i:i + 1], t[i:i + 1], t_next[i:i + 1], order)
        assert torch.allclose(step[i:i + 1], alone, atol=1e-12)


@pytest.mark.parametrize("levels", [(900, 500, 100), (600, 300, 20), (40, 10, -1), (999, 400, -1)])
def test_two_step_target_lands_one_ddim_step_where_the_teacher_lands_two(levels):
    t, t_mid, t_next = levels
    schedule = NoiseSchedule(T, "linear")
    gaussian = GaussianEps(ode_end=False)  # the posterior mean: its DDIM steps are not on one straight path
    teacher = Denoiser(gaussian, schedule, "eps").double()
    generator = torch.Generator().manual_seed(2)
    ab = paper_alpha_bars()[t]  # x_t from its marginal N(√ᾱ·μ, ᾱ·s² + 1 − ᾱ)
    x_t = MU * ab.sqrt() + (ab * S**2 + 1 - ab).sqrt() * torch.randn(64, 1, 4, 4, generator=generator,
                                                                     dtype=torch.float64)

    def x0_of(x, level):  # the teacher's x̂0, from its ε̂ (never near the clip at ±1 for this data)
        ab = paper_alpha_bars()[level]
        return (x - (1 - ab).sqrt() * gaussian(x, torch.full((64,), level))) / ab.sqrt()

    x_mid = ddim_step(x_t, t, t_mid, x0_of(x_t, t))
    two_steps = ddim_step(x_mid, t_mid, t_next, x0_of(x_mid, t_mid))
    full = lambda level: torch.full((64,), level)  # noqa: E731
    target = two_step_target(teacher, x_t, full(t), full(t_mid), full(t_next))
    assert torch.allclose(ddim_step(x_t, t, t_next, target), two_steps, atol=1e-9)
    one_step = ddim_step(x_t, t, t_next, x0_of(x_t, t))  # the teacher's own single step lands elsewhere
    assert (one_step - two_steps).abs().max() > 1e-3


def test_halving_stages_teach_each_student_with_twice_its_levels():
    config = student_config(load_config("smoke"), ["distill.method=progressive", "distill.ode_steps=8",
                                                  "distill.sample_steps=2", "distill.steps=11"])
    schedule = NoiseSchedule(config.diffusion.timesteps, config.diffusion.schedule)
    stages = halving_stages(schedule, config.distill)
    assert [len(s.levels) for s in stages] == [4, 2] and [s.steps for s in stages] == [5, 6]
    for stage in stages:
        n = len(stage.levels)
        assert stage.levels.tolist() == few_step_levels(schedule, n)
        assert stage.mid_levels.tolist() == few_step_levels(schedule, 2 * n)[1::2]
        assert stage.next_levels.tolist() == few_step_levels(schedule, n)[1:] + [-1]
        assert (stage.levels > stage.mid_levels).all() and (stage.mid_levels > stage.next_levels).all()
    with pytest.raises(ConfigError, match="ode_steps=24 must be distill.sample_steps=4 times 2, 4, 8"):
        student_config(load_config("smoke"), ["distill.method=progressive", "distill.ode_steps=24"])
    crowded = student_config(load_config("smoke"), ["distill.method=progressive", "distill.ode_steps=32"])  # T = 100
    with pytest.raises(ConfigError, match="do not fit between the schedule's"):
        halving_stages(schedule, crowded.distill)


def test_student_config_predicts_v_and_samples_with_the_consistency_sampler():
    teacher = load_config("smoke")
    student = student_config(teacher, ["distill.sample_steps=2", "distill.steps=7"])
    assert (student.diffusion.prediction, student.sample.sampler, student.sample.steps) == ("v", "consistency", 2)
    assert student_config(teacher, ["distill.prediction=eps"]).diffusion.prediction == "eps"
    assert student.distill.steps == 7 and student.model == teacher.model
    with pytest.raises(ConfigError, match="distill.ode_steps"):
        student_config(teacher, ["distill.ode_steps=1"])
    with pytest.raises(ConfigError, match=r"distill.loss_metric='huber' is unknown; choose one of l2, pseudo_huber"):
        student_config(teacher, ["distill.loss_metric=huber"])
    with pytest.raises(ConfigError, match=r"distill.teacher_order must be 1 \(DDIM\) or 2"):
        student_config(teacher, ["distill.teacher_order=3"])
    with pytest.raises(ConfigError, match="distill.teacher_order=2 with progressive distillation"):
        student_config(teacher, ["distill.method=progressive", "distill.ode_steps=16", "distill.teacher_order=2"])
    assert (student.sample.spacing, student.sample.levels_log_snr) == ("log_snr", ())
    assert student_config(teacher, ["distill.sample_levels_log_snr=[1,3,5]"]).sample.levels_log_snr == (1, 3, 5)
    with pytest.raises(ConfigError, match="give sample_steps − 1 levels"):
        student_config(teacher, ["distill.sample_levels_log_snr=[-1.5,0.5]"])
    with pytest.raises(ConfigError, match=r"sample_levels_log_snr=\[1.0, 3.0, 5.0\] with progressive distillation"):
        student_config(teacher, ["distill.method=progressive", "distill.sample_levels_log_snr=[1,3,5]"])


@pytest.mark.parametrize("method", ["consistency", "progressive"])
def test_distilled_student_is_a_model_the_cli_samples(method, smoke_cond_run, tmp_path, capsys, monkeypatch):
    from diffusion_core.checkpoint import load_model
    from diffusion_core.cli import main

    from safetensors import safe_open

    run_dir = tmp_path / "student"
    levels = (["--set", "distill.sample_levels_log_snr=[0.5]", "--set", "distill.teacher_order=2"]
              if method == "consistency" else [])
    weights = []  # the guidance weight of each guided teacher pass: the first stage's teacher only, for progressive
    monkeypatch.setattr(distill_module, "guided_eps", lambda *args: weights.append(args[-1]) or guided_eps(*args))
    monkeypatch.setattr(distill_module, "fast_bf16_cpu", lambda: True)  # "auto" takes bf16 on any CPU here
    bf16_calls = []  # for each pass in bf16: whether gradients were on (never: the student's own passes stay fp32)
    bf16_call = Bf16Passes.__call__
    monkeypatch.setattr(Bf16Passes, "__call__",
                        lambda self, *a, **k: bf16_calls.append(torch.is_grad_enabled()) or bf16_call(self, *a, **k))
    main(["distill", "--teacher", str(smoke_cond_run), "--run-dir", str(run_dir), "--set", f"distill.method={method}",
          "--set", "distill.ode_steps=8", "--set", "distill.sample_steps=2",  # progressive: 2 halvings of 3 steps
          "--set", "distill.steps=6", "--set", "distill.batch_size=8", "--set", "distill.log_every=3",
          "--set", "distill.guidance=1", "--set", "distill.lr=1e-3", "--set", "distill.warmup_steps=2",
          "--set", "distill.lr_decay=cosine", "--set", "distill.teacher_precision=auto", *levels])
    # consistency: 6 second-order teacher steps of 2 guided passes; progressive: 3 steps of 2 teacher steps
    assert weights == [1.0] * (6 * 2 if method == "consistency" else 2 * 3)
    # in bf16: consistency, its 12 guided teacher passes and the target network's 6; progressive, the 2 teacher steps
    # of each of its 6 steps, the second stage's teacher (the first's student) too
    assert bf16_calls == [False] * (6 * 2 + 6 if method == "consistency" else 6 * 2)
    reports = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reports] == [3, 6]
    # each report's lr is its last step's (indices 2, 5): after 2 warm-up steps, half a cosine over the other 4 (of all
    # stages together, for progressive): 1e-3·(1 + cos(π·k/4))/2 at k = 0, 3
    assert [r["lr"] for r in reports] == pytest.approx([1e-3, 1e-3 * (1 + math.cos(3 * math.pi / 4)) / 2], rel=1e-9)
    loaded = load_model(run_dir / "model")
    assert loaded.config.sample.sampler == method and loaded.config.diffusion.prediction == "v"
    assert loaded.config.sample.steps == 2 and loaded.config.distill.guidance == 1.0
    assert loaded.info["teacher"]["path"] == str(smoke_cond_run)
    assert loaded.info["teacher_precision"] == "bf16"
    assert loaded.config.sample.levels_log_snr == ((0.5,) if method == "consistency" else ())
    out = tmp_path / "grid.png"
    main(["sample", "--model", str(run_dir / "model"), "-n", "4", "--out", str(out)])
    assert out.is_file()
    tensors = tmp_path / "levels.safetensors"
    argv = ["sample", "--model", str(run_dir / "model"), "-n", "2", "--levels-log-snr=1,4", "--tensor-out", str(tensors)]
    if method == "progressive":  # its student learnt its own levels only
        with pytest.raises(SystemExit) as refused:
            main(argv)
        assert refused.value.code == 2 and "a setting of the consistency sampler" in capsys.readouterr().err
    else:
        main(argv)
        with safe_open(str(tensors), "pt") as saved:
            assert (saved.metadata()["steps"], saved.metadata()["levels_log_snr"]) == ("3", "1.0,4.0")
        # this schedule of 100 steps starts at log SNR −0.56: a level below it is refused before any sampling
        with pytest.raises(SystemExit) as refused:
            main([*argv[:5], "--levels-log-snr=-3"])
        assert refused.value.code == 2 and "sample.levels_log_snr refused for this model's linear schedule" in \
            capsys.readouterr().err
    # a second distillation into the same folder is refused before any work: the student stays
    weights = (run_dir / "model" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as refused:
        main(["distill", "--teacher", str(smoke_cond_run), "--run-dir", str(run_dir), "--set", "distill.steps=6"])
    assert refused.value.code == 2 and "already holds a distilled model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # an unknown decay, refused before any work
        main(["distill", "--teacher", str(smoke_cond_run), "--run-dir", str(tmp_path / "other"),
              "--set", "distill.lr_decay=linear"])
    assert refused.value.code == 2 and "distill.lr_decay='linear' is unknown" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    assert (run_dir / "model" / "model.safetensors").read_bytes() == weights


def test_sde_noise_is_part_of_the_gate_and_older_gates_keep_lu_et_als():
    """sample.sde_noise changes the samples, so a gate fixes it; one written before it existed scored at 1."""
    from flows.gate import DEFAULT_RULE, Gate, protocol_of

    config = load_config("smoke", {"sample.sampler": "dpm++2m-sde", "sample.sde_noise": 2.0})
    protocol = protocol_of(config, "lenet")
    assert protocol["sample.sde_noise"] == 2.0
    now = Gate(DEFAULT_RULE, protocol, 1, "test", "2026-12-05T00:00:00+00:00", "written with sde_noise")
    assert now.apply(config).sample.sde_noise == 2.0
    older = {key: value for key, value in protocol.items() if key != "sample.sde_noise"}
    gate = Gate(DEFAULT_RULE, older, 1, "test", "2026-01-01T00:00:00+00:00", "written before sde_noise existed")
    assert gate.apply(config).sample.sde_noise == 1.0
    # so a run asking that older gate's model for another noise is refused, not silently scored at 1
    gate.check_overrides("m", {"sample.sde_noise": 1.0}, None, "mnist")
    with pytest.raises(ConfigError, match=r"parameter sample.sde_noise refused: .* sample.sde_noise=1.0 .*got 2.0"):
        gate.check_overrides("m", {"sample.sde_noise": 2.0}, None, "mnist")


def test_a_students_levels_are_part_of_its_gate_and_older_gates_keep_scoring_without_them():
    """The levels change the samples, so the protocol a registered model's gate fixes holds them; a gate written
    before the protocol had them fixed the spacing's levels, and a run under it is scored with those."""
    from flows.gate import DEFAULT_RULE, Gate, protocol_of

    student = student_config(load_config("smoke"), {"distill.sample_levels_log_snr": [1, 3, 5]})
    protocol = protocol_of(student, "lenet")
    assert (protocol["sample.sampler"], protocol["sample.steps"], protocol["sample.levels_log_snr"]) == (
        "consistency", 4, [1, 3, 5])
    now = Gate(DEFAULT_RULE, protocol, 1, "test", "2026-12-05T00:00:00+00:00", "first")
    assert now.apply(student).sample.levels_log_snr == (1, 3, 5)
    older = Gate(DEFAULT_RULE, {k: v for k, v in protocol.items() if k != "sample.levels_log_snr"}, 1, "test",
                 "2026-01-01T00:00:00+00:00", "written before the protocol held levels")
    assert older.apply(student).sample.levels_log_snr == ()
