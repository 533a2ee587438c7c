"""Consistency distillation and the consistency sampler against exact answers.

- Gaussian data x0 ~ N(μ, s²) per pixel: the probability-flow ODE keeps the standardised value, so its end
  from x_t is f(x_t, t) = μ + s·(x_t − √ᾱ·μ)/√(ᾱ·s² + 1 − ᾱ) (the exact consistency function). Sampling
  with it must give N(μ, s²) at any number of steps; the posterior mean in its place must not.
- Data that is one image x*: the exact teacher's DDIM step lands exactly on the ODE (x_t' = √ᾱ'·x* +
  √(1−ᾱ')·ε with the same ε) and f = x* everywhere, so the distillation loss of the exact student is 0, and
  a student off by δ scores δ² exactly on the terms that reach clean data (the boundary f(x, −1) = x).
ᾱ comes from the tests' own table (linear β from 1e-4 to 0.02, Ho et al. §4), not the library's.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffusion_core import NoiseSchedule
from diffusion_core.config import ConfigError, load_config
from diffusion_core.denoiser import Denoiser
from diffusion_core.distill import (cleaner_level, consistency_distillation_loss, level_probabilities,
                                    student_config)
from diffusion_core.samplers import consistency_levels, sample, sampling_timesteps

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


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampler_draws_the_data_distribution_with_the_exact_consistency_function(steps):
    schedule = NoiseSchedule(T, "linear")
    shape = (4000, 1, 4, 4)
    exact = sample(GaussianEps(ode_end=True), schedule, shape, sampler="consistency", steps=steps,
                   generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    # 64,000 draws: the mean's standard error is 0.001, the std's 0.0007
    assert abs(exact.mean().item() - MU) < 0.006
    assert exact.std().item() == pytest.approx(S, rel=0.02)
    # the posterior mean in its place (an ordinary ε-model) shrinks the spread: the check can tell
    blurred = sample(GaussianEps(ode_end=False), schedule, shape, sampler="consistency", steps=steps,
                     generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    assert blurred.std().item() < 0.9 * S


def test_consistency_levels_are_the_first_steps_of_the_log_snr_grid():
    schedule = NoiseSchedule(T, "linear")
    assert consistency_levels(schedule, 4) == sampling_timesteps(schedule, 5, "log_snr")[:4]
    assert consistency_levels(schedule, 1) == [T - 1]
    with pytest.raises(ValueError, match="consistency sampler"):
        consistency_levels(schedule, T)


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


@pytest.mark.parametrize("weighting", ["none", "min_snr"])
@pytest.mark.parametrize("prediction", ["v", "eps"])
@pytest.mark.parametrize("delta", [0.0, 0.1])
def test_distillation_loss_of_the_exact_student_is_zero_and_the_boundary_is_exact(delta, prediction, weighting):
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
    loss = consistency_distillation_loss(student, target, teacher, x0, t, t_next, noise, weighting)
    # the target is δ off too, except where t' = −1: there it is the teacher's step itself, x*
    reaches_clean = (t_next < 0).double()
    assert 0 < float(reaches_clean.mean()) < 0.2
    ab = paper_alpha_bars()[t]
    weight = (ab / (1 - ab)).clamp(max=1.0) if weighting == "min_snr" else torch.ones_like(ab)
    assert loss.item() == pytest.approx(delta**2 * float((weight * reaches_clean).mean()), rel=1e-6, abs=1e-12)


def test_student_config_predicts_v_and_samples_with_the_consistency_sampler():
    teacher = load_config("smoke")
    student = student_config(teacher, ["distill.sample_steps=2", "distill.steps=7"])
    assert (student.diffusion.prediction, student.sample.sampler, student.sample.steps) == ("v", "consistency", 2)
    assert student_config(teacher, ["distill.prediction=eps"]).diffusion.prediction == "eps"
    assert student.distill.steps == 7 and student.model == teacher.model
    with pytest.raises(ConfigError, match="distill.ode_steps"):
        student_config(teacher, ["distill.ode_steps=1"])


def test_distilled_student_is_a_model_the_cli_samples(smoke_cond_run, tmp_path, capsys):
    from diffusion_core.checkpoint import load_model
    from diffusion_core.cli import main

    run_dir = tmp_path / "student"
    main(["distill", "--teacher", str(smoke_cond_run), "--run-dir", str(run_dir),
          "--set", "distill.steps=6", "--set", "distill.batch_size=8", "--set", "distill.log_every=3"])
    reports = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reports] == [3, 6]
    loaded = load_model(run_dir / "model")
    assert loaded.config.sample.sampler == "consistency" and loaded.config.diffusion.prediction == "v"
    assert loaded.info["teacher"]["path"] == str(smoke_cond_run)
    out = tmp_path / "grid.png"
    main(["sample", "--model", str(run_dir / "model"), "-n", "4", "--out", str(out)])
    assert out.is_file()
    # a second distillation into the same folder is refused before any work: the student stays
    weights = (run_dir / "model" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as refused:
        main(["distill", "--teacher", str(smoke_cond_run), "--run-dir", str(run_dir), "--set", "distill.steps=6"])
    assert refused.value.code == 2 and "already holds a distilled model" in capsys.readouterr().err
    assert (run_dir / "model" / "model.safetensors").read_bytes() == weights
