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


def test_every_parameter_reaches_the_output():
    """With every weight random (zero-initialised layers would block the gradient), one backward pass gives
    every parameter a gradient: a layer that is built but skipped, or a branch cut off, fails here."""
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mults=(1, 2), num_res_blocks=2, attention_levels=(1,), attention_heads=2,
                 dropout=0.0, num_classes=10)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    model(torch.randn(2, 1, 28, 28), torch.tensor([1, 500]), torch.tensor([3, 10])).square().mean().backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []


def test_parameter_count_follows_the_layout():
    """The documented layout of the smallest U-Net (one level, one block, mid attention), counted by hand:
    conv k×k from a to b channels has a·b·k² + b parameters, GroupNorm and the like 2 per channel."""
    c, e = 8, 32  # channels, embedding width (4c)

    def conv(a, b, k=3):
        return a * b * k * k + b

    def res_block(a, b):  # norm1, conv1, embedding → (scale, shift), norm2, conv2, 1×1 skip when a ≠ b
        return 2 * a + conv(a, b) + (e * 2 * b + 2 * b) + 2 * b + conv(b, b) + (conv(a, b, 1) if a != b else 0)

    attention = 2 * c + conv(c, 3 * c, 1) + conv(c, c, 1)
    expected = ((c * e + e) + (e * e + e)  # time MLP
                + conv(1, c)  # conv_in
                + res_block(c, c)  # down: one block
                + res_block(c, c) + attention + res_block(c, c)  # middle
                + 2 * res_block(2 * c, c)  # up: two blocks, each with a skip concatenated
                + 2 * c + conv(c, 1))  # norm_out, conv_out
    model = UNet(base_channels=c, channel_mults=(1,), num_res_blocks=1, attention_levels=())
    assert count_parameters(model) == expected


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
