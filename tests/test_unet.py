import pytest
import torch

from diffusion_core import UNet, UNetConfig
from diffusion_core.unet import count_parameters


@pytest.mark.parametrize("channels, size, patch", [(1, 28, 1), (3, 32, 1), (1, 28, 2), (3, 32, 4)])
def test_output_has_input_shape(channels, size, patch):
    mults = (1, 2) if patch > 1 else (1, 2, 2)  # 28 and 32: 2·2 or 4·2 patches, 1 or 2 halvings
    model = UNet(in_channels=channels, patch_size=patch, channel_mults=mults, attention_levels=(len(mults) - 1,))
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


@pytest.mark.parametrize("patch", [1, 2])
def test_every_parameter_reaches_the_output(patch):
    """With every weight random (zero-initialised layers would block the gradient), one backward pass gives
    every parameter a gradient: a layer that is built but skipped, or a branch cut off, fails here."""
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mults=(1, 2), num_res_blocks=2, attention_levels=(1,), attention_heads=2,
                 dropout=0.0, num_classes=10, patch_size=patch)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    model(torch.randn(2, 1, 28, 28), torch.tensor([1, 500]), torch.tensor([3, 10])).square().mean().backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []


@pytest.mark.parametrize("image_channels, patch", [(1, 1), (3, 2)])
def test_parameter_count_follows_the_layout(image_channels, patch):
    """The documented layout of the smallest U-Net (one level, one block, mid attention), counted by hand:
    conv k×k from a to b channels has a·b·k² + b parameters, GroupNorm and the like 2 per channel; patches of
    p×p pixels enter and leave as image_channels·p² channels."""
    c, e = 8, 32  # channels, embedding width (4c)
    io = image_channels * patch * patch

    def conv(a, b, k=3):
        return a * b * k * k + b

    def res_block(a, b):  # norm1, conv1, embedding → (scale, shift), norm2, conv2, 1×1 skip when a ≠ b
        return 2 * a + conv(a, b) + (e * 2 * b + 2 * b) + 2 * b + conv(b, b) + (conv(a, b, 1) if a != b else 0)

    attention = 2 * c + conv(c, 3 * c, 1) + conv(c, c, 1)
    expected = ((c * e + e) + (e * e + e)  # time MLP
                + conv(io, c)  # conv_in
                + res_block(c, c)  # down: one block
                + res_block(c, c) + attention + res_block(c, c)  # middle
                + 2 * res_block(2 * c, c)  # up: two blocks, each with a skip concatenated
                + 2 * c + conv(c, io))  # norm_out, conv_out
    model = UNet(in_channels=image_channels, base_channels=c, channel_mults=(1,), num_res_blocks=1,
                 attention_levels=(), patch_size=patch)
    assert count_parameters(model) == expected


@pytest.mark.parametrize("kwargs, match", [
    (dict(channel_mults=(1, 2, 2, 2)), "multiples of 8"),
    (dict(channel_mults=(1, 2, 2), patch_size=2), "multiples of 8"),  # 28 → 14 (patches) → 7 → 3.5
    (dict(channel_mults=(1,), attention_levels=(), patch_size=3), "multiples of 3"),
])
def test_image_size_that_cannot_be_halved(kwargs, match):
    model = UNet(**kwargs)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(1, 1, 28, 28), torch.tensor([0]))  # 28 → 14 → 7 → 3.5


@pytest.mark.parametrize("image_channels, patch", [(1, 2), (3, 2), (2, 4)])
def test_patches_leave_as_they_came_in(image_channels, patch):
    """Space-to-depth in, depth-to-space out, one layout: output channel k of the last convolution lands on
    image channel k // p², at the pixels whose row and column within each p×p patch are divmod(k % p², p);
    and image channel c's pixel at offset (a, b) in its patch enters the first convolution as channel
    c·p² + a·p + b at the patch's position."""
    torch.manual_seed(0)
    model = UNet(in_channels=image_channels, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                 attention_levels=(), dropout=0.0, patch_size=patch)
    size = 4 * patch
    x, t = torch.randn(1, image_channels, size, size), torch.tensor([3])
    with torch.no_grad():
        base = model(x, t)
        for k in range(image_channels * patch * patch):
            model.conv_out.bias[k] += 1.0
            moved = (model(x, t) - base).abs() > 0.5
            model.conv_out.bias[k] -= 1.0
            c, (a, b) = k // patch**2, divmod(k % patch**2, patch)
            expected = torch.zeros_like(moved)
            expected[0, c, a::patch, b::patch] = True
            assert torch.equal(moved, expected), k

    seen = {}
    model.conv_in.register_forward_hook(lambda module, args, out: seen.update(input=args[0]))
    c, a, b, i, j = image_channels - 1, patch - 1, 0, 2, 1  # image channel c, patch (i, j), offset (a, b)
    x = torch.zeros(1, image_channels, size, size)
    x[0, c, i * patch + a, j * patch + b] = 1.0
    model(x, t)
    expected = torch.zeros(1, image_channels * patch * patch, 4, 4)
    expected[0, c * patch * patch + a * patch + b, i, j] = 1.0
    assert torch.equal(seen["input"], expected)


def test_wrong_channels_is_clear():
    with pytest.raises(ValueError, match=r"expects \[B, 1, H, W\]"):
        UNet()(torch.randn(1, 3, 28, 28), torch.tensor([0]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(base_channels=6), "base_channels"),
    (dict(attention_levels=(5,)), "attention_levels"),
    (dict(dropout=1.5), "dropout"),
    (dict(patch_size=0), "patch_size"),
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
