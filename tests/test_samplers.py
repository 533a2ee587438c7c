"""Sampler behaviour beyond the exact propagation of tests/test_sampler_oracle.py: point masses, seeds,
bad arguments, and the one rule for default steps and spacing.

Data x0 ~ N(μ, s²I): x_t ~ N(√ᾱ·μ, ᾱs² + 1 − ᾱ) and the optimal noise prediction is exactly
ε̂*(x_t, t) = E[ε | x_t] = √(1−ᾱ) · (x_t − √ᾱ·μ) / (ᾱ·s² + 1 − ᾱ).
"""

import dataclasses

import pytest
import torch

from diffusion_core import NoiseSchedule, ddim_sample, dpm_solver_sample, sample
from diffusion_core.config import ConfigError, SampleConfig
from diffusion_core.samplers import DEFAULT_STEPS, sampling_timesteps

MU, S = 0.2, 0.25


def optimal_eps(schedule, mu=MU, s=S):
    def model(x, t):
        ab = schedule.gather("alpha_bars", t, x)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s * s + 1 - ab)
    return model


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule(1000, "linear")


@pytest.mark.parametrize("steps", [1000, 50, 7, 1])
def test_ddim_single_point_returns_the_point(linear, steps):
    """s = 0: x̂0 is the point at every step; η = 0 must end exactly there (fails if the last step
    stops short of ᾱ = 1, or if x is reset when η = 0)."""
    point = 0.3
    x = ddim_sample(optimal_eps(linear, point, 0.0), linear, (8, 1, 3, 3), steps=steps, eta=0.0,
                    generator=torch.Generator().manual_seed(3), dtype=torch.float64, clip_x0=False)
    assert torch.allclose(x, torch.full_like(x, point), atol=1e-9)


def test_same_seed_same_images(linear):
    model = optimal_eps(linear)
    a = ddim_sample(model, linear, (4, 1, 2, 2), steps=10, eta=0.5, generator=torch.Generator().manual_seed(5))
    b = ddim_sample(model, linear, (4, 1, 2, 2), steps=10, eta=0.5, generator=torch.Generator().manual_seed(5))
    c = ddim_sample(model, linear, (4, 1, 2, 2), steps=10, eta=0.5, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=1001), r"steps must be an integer in \[1, 1000\]"),
    (dict(steps=0), "steps must be"),
    (dict(eta=1.5), r"eta must be in \[0, 1\]"),
    (dict(eta=-0.1), "eta must be"),
    (dict(spacing="quadratic"), "unknown spacing"),
])
def test_ddim_bad_arguments(linear, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ddim_sample(optimal_eps(linear), linear, (1, 1, 2, 2), **kwargs)


def test_sde_dpm_solver_uses_the_noise(linear):
    """Same x_T, other noise → other images; a point mass stays a point (the noise is all removed)."""
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    runs = [dpm_solver_sample(optimal_eps(linear), linear, x_T.shape, x_T=x_T, steps=20, noise=1.0,
                              generator=torch.Generator().manual_seed(seed), dtype=torch.float64, clip_x0=False)
            for seed in (1, 2)]
    assert (runs[0] - runs[1]).abs().max() > 0.05
    point = dpm_solver_sample(optimal_eps(linear, 0.3, 0.0), linear, (8, 1, 3, 3), steps=10, noise=1.0,
                              generator=torch.Generator().manual_seed(3), clip_x0=False)
    assert torch.allclose(point, torch.full_like(point, 0.3), atol=1e-5)


def test_generate_batches_samples_at_the_settings_sde_noise(linear):
    """sample.sde_noise reaches the solver: batch k is dpm_solver_sample with that noise and batch k's seed."""
    from diffusion_core.images import to_uint8
    from diffusion_core.samplers import generate_batches

    model = optimal_eps(linear)
    settings = SampleConfig(sampler="dpm++2m-sde", steps=6, sde_noise=3.0, num_samples=5, batch_size=5, seed=2)
    got = torch.cat(list(generate_batches(model, linear, (1, 4, 4), settings, device="cpu", progress=False)))
    for noise in (3.0, 1.0):
        direct = dpm_solver_sample(model, linear, (5, 1, 4, 4), steps=6, noise=noise,
                                   generator=torch.Generator().manual_seed(2 * 1_000_003))
        assert torch.equal(got, to_uint8(direct)) == (noise == 3.0)


class CountingModel:
    """The optimal ε̂, recording the timesteps it is called at."""

    def __init__(self, schedule):
        self.eps, self.timesteps = optimal_eps(schedule), []

    def __call__(self, x, t):
        self.timesteps.append(int(t[0]))
        return self.eps(x, t)


@pytest.mark.parametrize("sampler, steps, spacing", [
    ("ddpm", 1000, "linear"), ("ddim", DEFAULT_STEPS, "linear"),
    ("dpm++2m", DEFAULT_STEPS, "log_snr"), ("dpm++2m-sde", DEFAULT_STEPS, "log_snr"),
])
def test_library_and_settings_share_the_defaults(linear, sampler, steps, spacing):
    """sample() without steps or spacing visits the grid that SampleConfig.resolved names: all T for DDPM,
    log-SNR spacing for both DPM-Solver++ forms."""
    model = CountingModel(linear)
    sample(model, linear, (2, 1, 1, 1), sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert model.timesteps == sampling_timesteps(linear, steps, spacing)
    resolved = SampleConfig(sampler=sampler).resolved(linear.timesteps)
    assert (resolved.steps, resolved.spacing) == (steps, spacing)


def test_ddpm_takes_fewer_steps_when_asked(linear):
    model = CountingModel(linear)
    sample(model, linear, (2, 1, 1, 1), sampler="ddpm", steps=25, spacing="log_snr",
           generator=torch.Generator().manual_seed(0))
    assert model.timesteps == sampling_timesteps(linear, 25, "log_snr")


def test_settings_override_keeps_steps_and_spacing_with_their_sampler():
    configured = SampleConfig(sampler="ddim", steps=20, spacing="log_snr", eta=0.5)
    assert configured.override(steps=None, seed=3) == dataclasses.replace(configured, seed=3)
    assert configured.override(sampler="ddim", steps=10).steps == 10
    other = configured.override(sampler="ddpm")  # DDIM's 20 log-SNR steps were not chosen for DDPM
    assert (other.steps, other.spacing, other.eta) == (None, None, 0.5)
    assert configured.override(sampler="dpm++2m", steps=8).resolved(1000).steps == 8
    with pytest.raises(ConfigError, match=r"sample.spacing='even' is unknown"):
        configured.override(spacing="even")
    with pytest.raises(ConfigError, match=r"sample.steps must be >= 1"):
        SampleConfig(steps=0)
