import pytest
import torch

from diffusion_core import UNet, UNetConfig
from diffusion_core.unet import count_parameters


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_output_has_input_shape(channels, size):
    model = UNet(in_channels=channels)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape


def test_output_depends_on_time_and_input():
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), attention_heads=2, dropout=0.0)
    for p in model.parameters():  # zero-initialised output layers would hide the dependence
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 1, 28, 28)
    a, b = model(x, torch.tensor([10])), model(x, torch.tensor([900]))
    assert (a - b).abs().max() > 1e-3 * a.abs().max()  # the time embedding survives normalisation
    assert (a - model(x + 0.1, torch.tensor([10]))).abs().max() > 1e-3 * a.abs().max()


def test_output_layer_gets_gradient():
    model = UNet(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), attention_heads=2)
    out = model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]))
    (out - torch.randn_like(out)).square().mean().backward()
    # the zero-initialised output conv is the only layer with a gradient on the very first step
    assert model.conv_out.weight.grad.abs().sum() > 0
    assert count_parameters(model) > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(channel_mults=(1, 2, 2, 2)), "multiples of 8"),
])
def test_image_size_that_cannot_be_halved(kwargs, match):
    model = UNet(**kwargs)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(1, 1, 28, 28), torch.tensor([0]))  # 28 → 14 → 7 → 3.5


def test_wrong_channels_is_clear():
    with pytest.raises(ValueError, match=r"expects \[B, 1, H, W\]"):
        UNet()(torch.randn(1, 3, 28, 28), torch.tensor([0]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(base_channels=6), "base_channels"),
    (dict(attention_levels=(5,)), "attention_levels"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**kwargs)


def test_class_conditioning_hook():
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mults=(1, 2), attention_levels=(), num_classes=10, dropout=0.0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 5])
    a, b = model(x, t, torch.tensor([3, 3])), model(x, t, torch.tensor([7, 7]))
    assert (a - b).abs().max() > 1e-3 * a.abs().max()
    assert torch.equal(model(x, t), model(x, t, torch.tensor([10, 10])))  # no label = the "no class" token
    with pytest.raises(ValueError, match="without class conditioning"):
        UNet(base_channels=8, channel_mults=(1, 2), attention_levels=())(x, t, torch.tensor([1, 2]))
