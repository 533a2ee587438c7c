"""Self-conditioning (Chen et al. 2022): the network also reads an estimate of x0. In training half the images get
the network's own first estimate (no gradient), the rest zeros; in sampling every call gets the x̂0 of the call
before, zeros at the first. The recording network below sees exactly what the Denoiser or the sampler hands it;
what it should have been handed is worked out here from x̂0 = (x_t − √(1−ᾱ)·ε̂)/√ᾱ."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_core import NoiseSchedule, UNet, UNetConfig
from diffusion_core.denoiser import Denoiser
from diffusion_core.samplers import sample, sampling_timesteps

T = 1000


class Recording(nn.Module):
    """ε̂ = 0.5·x_t + 0.1·(x0_estimate or 0): a network that reads the estimate, recording each one it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.config = UNetConfig(self_condition=True)
        self.seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x, t, x0_estimate=None, **cond):
        self.seen.append((x.clone(), None if x0_estimate is None else x0_estimate.clone()))
        return 0.5 * x + (0.0 if x0_estimate is None else 0.1 * x0_estimate)


def x0_from(schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    ab = schedule.alpha_bars[t].double().view(-1, 1, 1, 1)
    return ((x.double() - (1 - ab).sqrt() * eps.double()) / ab.sqrt()).clamp(-1, 1)


def test_each_sampler_call_reads_the_estimate_of_the_call_before():
    schedule = NoiseSchedule(T, "linear")
    net = Recording()
    sample(Denoiser(net, schedule), schedule, (3, 1, 4, 4), sampler="ddim", steps=5,
           generator=torch.Generator().manual_seed(0), clip_x0=False)
    assert len(net.seen) == 5 and net.seen[0][1] is None
    grid = sampling_timesteps(schedule, 5, "linear")
    for k in range(1, 5):
        x_before, estimate_before = net.seen[k - 1]
        eps_before = 0.5 * x_before + (0.0 if estimate_before is None else 0.1 * estimate_before)
        t_before = torch.full((3,), grid[k - 1])
        expected = x0_from(schedule, x_before, t_before, eps_before)
        assert torch.allclose(net.seen[k][1].double(), expected, atol=1e-5)
    again = Recording()  # a new run starts without an estimate: nothing carries over from the last one
    sample(Denoiser(again, schedule), schedule, (3, 1, 4, 4), sampler="ddim", steps=2, clip_x0=False)
    assert again.seen[0][1] is None


def test_training_gives_half_the_images_their_first_estimate():
    schedule = NoiseSchedule(T, "linear")
    net = Recording()
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    t, noise = torch.tensor([10, 300, 600, 990]), torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    which = torch.tensor([True, False, True, False])
    Denoiser(net, schedule).loss(x0, t, noise, self_conditioned=which)
    (first_x, first_estimate), (x_t, estimate) = net.seen
    assert first_estimate is None and torch.equal(first_x, x_t[which])  # the first pass: only the chosen images
    expected = torch.zeros_like(x_t, dtype=torch.float64)
    expected[which] = x0_from(schedule, x_t[which], t[which], 0.5 * x_t[which])
    assert torch.allclose(estimate.double(), expected, atol=1e-5)


def test_the_unet_reads_the_estimate_only_when_built_for_it():
    torch.manual_seed(0)
    net = UNet(base_channels=8, channel_mults=(1, 2), attention_levels=(), dropout=0.0, self_condition=True)
    for p in net.parameters():  # zero-initialised output layers would hide the dependence
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 500])
    assert torch.equal(net(x, t), net(x, t, x0_estimate=torch.zeros_like(x)))  # no estimate = zeros
    assert (net(x, t) - net(x, t, x0_estimate=x.clamp(-1, 1))).abs().max() > 1e-3
    plain = UNet(base_channels=8, channel_mults=(1, 2), attention_levels=(), dropout=0.0)
    with pytest.raises(ValueError, match="trained without self-conditioning"):
        plain(x, t, x0_estimate=x)


def test_a_self_conditioning_model_trains_saves_and_samples(mnist_raw_source, data_dir, tmp_path):
    from diffusion_core import load_config, load_model, train
    from diffusion_core.config import SampleConfig
    from diffusion_core.samplers import generate_batches

    config = load_config("smoke", {"data.source": str(mnist_raw_source), "data.data_dir": str(data_dir),
                                   "model.self_condition": True, "train.steps": 4})
    train(config, tmp_path / "run", progress=False)
    loaded = load_model(tmp_path / "run")
    assert loaded.config.model.self_condition and loaded.denoiser.net.conv_in.in_channels == 2
    images = torch.cat(list(generate_batches(loaded.denoiser, loaded.denoiser.schedule, (1, 28, 28),
                                             SampleConfig(steps=3, num_samples=2), device="cpu", progress=False)))
    assert images.shape == (2, 1, 28, 28)
    from diffusion_core.config import ConfigError
    from diffusion_core.distill import distill
    with pytest.raises(ConfigError, match="distil a model trained without self-conditioning"):
        distill(tmp_path / "run", tmp_path / "student", {"distill.steps": 2}, progress=False)
    assert not (tmp_path / "student").exists()  # refused before any work
