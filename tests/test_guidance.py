"""Classifier-free guidance: the batched guided ε̂, label dropout, and every sampler against an
analytic class-conditional Gaussian mixture.

Data: class k ~ N(μ_k, s²) (equal priors). Then x_t | k ~ N(√ᾱ·μ_k, v) with v = ᾱs² + 1 − ᾱ, the
optimal class-conditional noise prediction is ε̂_k = √(1−ᾱ)·(x_t − √ᾱ·μ_k)/v, and the optimal
unconditional one is the posterior mixture ε̂_∅ = Σ_k p(k | x_t)·ε̂_k with p(k | x_t) ∝ N(x_t; √ᾱ·μ_k, v).
"""

from types import SimpleNamespace

import pytest
import torch

from diffusion_core import NoiseSchedule
from diffusion_core.config import ConfigError, SampleConfig
from diffusion_core.guidance import balanced_labels, drop_labels, guided, parse_classes
from diffusion_core.samplers import ddim_sample, generate_batches, sample
from diffusion_core.unet import UNet, UNetConfig

MEANS = torch.tensor([-0.6, 0.0, 0.6], dtype=torch.float64)
S = 0.1
PER_CLASS = 4000


class MixtureEps:
    """The exact optimal ε̂(x_t, t, class) for the mixture above; class index K is "no class"."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule = schedule
        self.config = SimpleNamespace(num_classes=len(MEANS))  # what guidance reads, as from a U-Net
        self.calls = []

    def __call__(self, x, t, class_labels=None):
        self.calls.append(x.shape[0])
        ab = self.schedule.gather("alpha_bars", t, x)  # [B, 1, 1, 1]
        v = ab * S * S + 1 - ab
        centres = ab.sqrt() * MEANS.to(x.dtype).reshape(1, -1, 1, 1)  # [B, K, 1, 1] over a singleton C axis
        eps_k = (1 - ab).sqrt() * (x - centres) / v  # broadcasts x [B, 1, 1, 1] → [B, K, 1, 1]
        log_w = -((x - centres) ** 2) / (2 * v)
        eps_uncond = (torch.softmax(log_w, dim=1) * eps_k).sum(1, keepdim=True)
        labels = torch.full((x.shape[0],), len(MEANS)) if class_labels is None else class_labels
        conditional = eps_k.gather(1, labels.clamp(max=len(MEANS) - 1).reshape(-1, 1, 1, 1))
        return torch.where((labels == len(MEANS)).reshape(-1, 1, 1, 1), eps_uncond, conditional)


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule(1000, "linear")


def _labels():
    return torch.arange(len(MEANS)).repeat_interleave(PER_CLASS)


def _per_class(x, labels):
    return [(x[labels == k].mean().item(), x[labels == k].std().item()) for k in range(len(MEANS))]


@pytest.mark.parametrize("sampler, kwargs", [
    ("ddim", {"steps": 1000}),
    ("ddpm", {}),
    ("dpm++2m", {"steps": 20, "spacing": "log_snr"}),
    ("dpm++2m-sde", {"steps": 100, "spacing": "log_snr"}),
])
def test_guidance_zero_reproduces_each_class(linear, sampler, kwargs):
    labels = _labels()
    x = sample(MixtureEps(linear), linear, (len(labels), 1, 1, 1), sampler=sampler, class_labels=labels, guidance=0.0,
               generator=torch.Generator().manual_seed(0), dtype=torch.float64, clip_x0=False, **kwargs)
    for k, (mean, std) in enumerate(_per_class(x.flatten(), labels)):
        assert mean == pytest.approx(MEANS[k].item(), abs=0.01), (k, mean)
        assert std == pytest.approx(S, rel=0.05), (k, std)


def test_unconditional_request_reproduces_the_mixture(linear):
    n = 3 * PER_CLASS
    x = ddim_sample(MixtureEps(linear), linear, (n, 1, 1, 1), steps=1000, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64, clip_x0=False).flatten()
    nearest = (x[:, None] - MEANS[None, :]).abs().argmin(1)
    shares = torch.bincount(nearest, minlength=len(MEANS)).double() / n
    assert torch.allclose(shares, torch.full_like(shares, 1 / 3), atol=0.02), shares
    assert x.std().item() == pytest.approx((MEANS.var(unbiased=False).item() + S * S) ** 0.5, rel=0.03)


def test_guidance_pushes_classes_away_from_the_unconditional_mean(linear):
    labels = _labels()
    results = {}
    for w in (0.0, 1.0, 3.0):
        x = ddim_sample(guided(MixtureEps(linear), labels, w), linear, (len(labels), 1, 1, 1), steps=200,
                        generator=torch.Generator().manual_seed(2), dtype=torch.float64, clip_x0=False).flatten()
        results[w] = _per_class(x, labels)
    unconditional_mean = MEANS.mean().item()
    for k in (0, 2):  # the outer classes move outwards, monotonically in w
        distances = [abs(results[w][k][0] - unconditional_mean) for w in (0.0, 1.0, 3.0)]
        assert distances[0] < distances[1] < distances[2], (k, distances)
    middle = [results[w][1][0] for w in (0.0, 1.0, 3.0)]  # the middle class sits at the mixture mean: stays put
    assert max(abs(m) for m in middle) < 0.01, middle
    spreads = [results[w][1][1] for w in (0.0, 1.0, 3.0)]  # and its spread narrows (less diversity)
    assert spreads[0] > spreads[1] > spreads[2], spreads


def test_one_step_follows_the_guidance_formula(linear):
    """DDIM with one step maps x_T straight to x̂0 = (x_T − √(1−ᾱ)·ε̃)/√ᾱ, ε̃ = (1+w)·ε̂_c − w·ε̂_∅."""
    model, w = MixtureEps(linear), 2.5
    x_T = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(-1, 1, 1, 1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    out = ddim_sample(guided(model, labels, w), linear, x_T.shape, steps=1, x_T=x_T, clip_x0=False,
                      dtype=torch.float64)
    t = torch.full((9,), linear.timesteps - 1)
    eps = (1 + w) * model(x_T, t, labels) - w * model(x_T, t, torch.full_like(labels, 3))
    ab = linear.alpha_bars[-1]
    assert torch.allclose(out, (x_T - (1 - ab).sqrt() * eps) / ab.sqrt(), atol=1e-12)


def _conditional_unet():
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,),
                          attention_heads=2, dropout=0.0, num_classes=10)).eval()
    with torch.no_grad():  # zero-initialised output layers would make every comparison trivially 0 = 0
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_batched_guidance_equals_two_separate_passes():
    net = _conditional_unet()
    x, t = torch.randn(6, 1, 28, 28), torch.tensor([0, 10, 50, 99, 500, 999])
    labels = torch.tensor([0, 3, 7, 7, 9, 1])
    with torch.no_grad():
        conditional = net(x, t, class_labels=labels)
        unconditional = net(x, t, class_labels=torch.full_like(labels, 10))
        assert (conditional - unconditional).abs().max() > 1e-3  # the class changes the output
        for w in (0.0, 1.0, 3.0):
            combined = guided(net, labels, w)(x, t)
            assert combined.shape == x.shape
            assert torch.allclose(combined, (1 + w) * conditional - w * unconditional, atol=1e-5), w
        assert torch.allclose(net(x, t), unconditional, atol=1e-6)  # no labels = the "no class" token


def test_guidance_runs_one_batched_forward_pass(linear):
    model, labels = MixtureEps(linear), torch.tensor([0, 2, 1, 1])
    ddim_sample(guided(model, labels, 3.0), linear, (4, 1, 1, 1), steps=5, generator=torch.Generator().manual_seed(0))
    assert model.calls == [8] * 5  # one call of 2B per step
    model.calls.clear()
    ddim_sample(guided(model, labels, 0.0), linear, (4, 1, 1, 1), steps=5, generator=torch.Generator().manual_seed(0))
    assert model.calls == [4] * 5  # w = 0: the conditional pass only


def test_requests_that_do_not_fit_the_model_fail_before_sampling(linear):
    unconditional = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=()))
    shape = (1, 28, 28)
    with pytest.raises(ValueError, match="unconditional"):
        next(generate_batches(unconditional, linear, shape, SampleConfig(num_samples=2, batch_size=2, guidance=1.0),
                              device="cpu", progress=False, class_labels=torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long), class_labels=torch.tensor([1]))
    model = MixtureEps(linear)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        sample(model, linear, (2, 1, 1, 1), class_labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="needs class labels"):
        sample(model, linear, (2, 1, 1, 1), guidance=2.0)
    with pytest.raises(ValueError, match=">= 0"):
        sample(model, linear, (2, 1, 1, 1), class_labels=torch.tensor([0, 1]), guidance=-1.0)
    with pytest.raises(ValueError, match="3 class labels for 2"):
        sample(model, linear, (2, 1, 1, 1), class_labels=torch.tensor([0, 1, 2]))
    assert model.calls == []  # nothing was sampled


def test_label_dropout_rate():
    labels = torch.randint(0, 10, (200_000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(1))
    is_null = dropped == 10
    assert is_null.float().mean().item() == pytest.approx(0.1, abs=0.003)
    assert torch.equal(dropped[~is_null], labels[~is_null])  # the rest are untouched
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)
    assert bool((drop_labels(labels, 1.0, 10) == 10).all())


def test_class_request_helpers():
    assert parse_classes("7", 10) == [7]
    assert parse_classes("1, 3,5", 10) == [1, 3, 5]
    assert parse_classes("all", 3) == [0, 1, 2]
    for bad in ("10", "-1", "seven", ""):
        with pytest.raises(ValueError, match=r"\[0, 9\]|class numbers"):
            parse_classes(bad, 10)
    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]


# A small conditional U-Net trained briefly on real MNIST (about 2.5 minutes on a 2-core CPU). Measured
# there (seed 0, 200 samples, DDIM-20, w = 3) after these 600 steps: class consistency 0.81; chance is
# 0.10. The bar is 4× chance and half the measured value, so library or BLAS differences do not trip it
# while a conditioning path that does nothing (≈ 0.10) does.
CONSISTENCY_BAR = 0.4
SHORT_CONDITIONAL = {"model.num_classes": 10, "model.base_channels": 16, "model.channel_mults": [1, 2, 2],
                     "model.attention_levels": [], "diffusion.timesteps": 1000, "train.steps": 600,
                     "train.batch_size": 32, "train.lr": 2e-3, "train.warmup_steps": 20, "train.ema_decay": 0.99,
                     "train.log_every": 100, "train.checkpoint_every": 600}


def test_short_conditional_mnist_training_draws_the_requested_digits(smoke_overrides, tmp_path):
    from diffusion_core import load_config, load_model, train
    from diffusion_core.evaluation import evaluate

    train(load_config("smoke", {**smoke_overrides, **SHORT_CONDITIONAL}), tmp_path, progress=False)
    model = load_model(tmp_path / "model")
    guided_result = evaluate(model, num_samples=200, steps=20, guidance=3.0, progress=False, device="cpu")
    assert guided_result["class_consistency_lenet_ddim20_w3"] >= CONSISTENCY_BAR, guided_result


def test_a_model_trained_without_label_dropout_refuses_guidance_at_every_door(smoke_overrides, tmp_path, capsys):
    """With train.label_dropout = 0 the "no class" embedding is never trained, so ε̂(x, ∅) is whatever it was
    initialised to: the CLI, the evaluator, the served model and the sampling flow refuse w > 0 by name and
    still sample at w = 0."""
    from mlflow.exceptions import MlflowException

    from diffusion_core import load_config, load_model, train
    from diffusion_core.cli import main
    from diffusion_core.serving import default_params, request
    from flows.sample_model import _request

    train(load_config("smoke", {**smoke_overrides, "model.num_classes": 10, "train.label_dropout": 0.0,
                                "sample.guidance_sweep": []}), tmp_path, progress=False)
    loaded = load_model(tmp_path / "model")
    for argv in (["sample", "--model", str(tmp_path / "model"), "--class", "7", "--guidance", "2", "--device", "cpu"],
                 ["evaluate", "--model", str(tmp_path / "model"), "--guidance", "2", "--device", "cpu"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and "train.label_dropout=0" in capsys.readouterr().err
    params = {**default_params(loaded.config), "guidance": 2.0}
    with pytest.raises(MlflowException, match=r"guidance 2\.0 refused: .*train\.label_dropout=0"):
        request(loaded.config, {"class": [7]}, params)
    with pytest.raises(ConfigError, match=r"guidance 2\.0 refused: .*train\.label_dropout=0"):
        _request(loaded, {"guidance": 2.0}, 4, 2, [7])
    settings, labels = request(loaded.config, {"class": [7]}, {**params, "guidance": 0.0})
    assert settings.guidance == 0.0 and labels.tolist() == [7]
    assert _request(loaded, {"guidance": 0.0}, 4, 2, [7])[0].guidance == 0.0
