import math

import pytest
import torch

from diffusion_core import NoiseSchedule
from diffusion_core.schedule import cosine_alpha_bar


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_strictly_decreasing_to_zero(kind):
    s = NoiseSchedule(1000, kind)
    assert s.betas.dtype == torch.float64 and s.alpha_bars.shape == (1000,)
    assert torch.all(s.alpha_bars[1:] < s.alpha_bars[:-1])
    assert 0 < s.alpha_bars[-1] < 1e-4
    assert torch.all((s.betas > 0) & (s.betas <= 0.999))


def test_linear_endpoints():
    s = NoiseSchedule(1000, "linear")
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(s.alpha_bars, torch.cumprod(1 - s.betas, 0))


def test_cosine_matches_defining_formula():
    T, s_ = 1000, 0.008
    s = NoiseSchedule(T, "cosine")
    t = torch.arange(1, T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2
    f0 = math.cos(s_ / (1 + s_) * math.pi / 2) ** 2
    unclipped = s.betas < 0.999
    # where β is not clipped, ᾱ_t = f(t)/f(0) exactly (eq. 17)
    assert torch.allclose(s.alpha_bars[unclipped], (f / f0)[unclipped], rtol=1e-10, atol=1e-12)
    assert torch.allclose(cosine_alpha_bar(t, T, s_), f / f0)
    assert s.betas[-1].item() == pytest.approx(0.999)  # the clip is active at the very end


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="quadratic"), "unknown schedule kind"),
    (dict(timesteps=0), "positive integer"),
    (dict(beta_start=0.1, beta_end=0.01), "beta_start <= beta_end"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(**kwargs)


def test_tables_follow_device_and_dtype():
    s = NoiseSchedule(10)
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float16)
    g = s.gather("alpha_bars", torch.tensor([0, 5, 9]), x)
    assert g.shape == (3, 1, 1, 1) and g.dtype == torch.float16
