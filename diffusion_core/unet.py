"""A time-conditioned U-Net ε-model (the DDPM architecture of Ho et al. 2020, Appendix B, scaled down).

Layout for `channel_mults=(1, 2, 2)` on 28×28: resolutions 28 → 14 → 7 (two stride-2 downsamplings,
so every skip connection matches), self-attention at the levels in `attention_levels`,
upsampling by nearest-neighbour interpolation + 3×3 conv (no transposed-conv checkerboards).

`patch_size = p > 1` folds each p×p patch of pixels into channels before the first level and unfolds the
output the same way (space-to-depth, `pixel_unshuffle`; the patching of DiT, Peebles & Xie 2023, and of
simple diffusion, Hoogeboom et al. 2023): a 28×28×1 image enters as 14×14×4 at p = 2, so the levels run at
14 → 7 and the network skips the full-resolution level, where small channel counts use the CPU worst.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1            # image channels (1 for MNIST, 3 for CIFAR-10)
    base_channels: int = 32         # channels at full resolution
    channel_mults: tuple[int, ...] = (1, 2, 2)  # per resolution level; len - 1 = number of downsamplings
    num_res_blocks: int = 2         # residual blocks per level on the way down
    attention_levels: tuple[int, ...] = (2,)  # level indices (0 = full resolution) with self-attention
    attention_heads: int = 4        # heads in each self-attention layer
    dropout: float = 0.1            # dropout inside residual blocks
    num_classes: int | None = None  # class-conditional: the dataset's class count; None = unconditional
    patch_size: int = 1             # pixels per side folded into channels before the first level (1 = none)
    self_condition: bool = False    # also read an earlier estimate of x0 (Chen et al. 2022; zeros when there is none)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        problems = []
        if self.in_channels < 1:
            problems.append(f"model.in_channels must be >= 1, got {self.in_channels}")
        if self.base_channels < 1 or self.base_channels % 4:
            problems.append(f"model.base_channels must be a positive multiple of 4, got {self.base_channels}")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            problems.append(f"model.channel_mults must be positive integers, got {self.channel_mults}")
        if any(not 0 <= lvl < len(self.channel_mults) for lvl in self.attention_levels):
            problems.append(
                f"model.attention_levels must index channel_mults (0..{len(self.channel_mults) - 1}), "
                f"got {self.attention_levels}"
            )
        if self.num_res_blocks < 1:
            problems.append(f"model.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 1:
            problems.append(f"model.num_classes must be >= 1 or unset, got {self.num_classes}")
        if self.attention_heads < 1:
            problems.append(f"model.attention_heads must be >= 1, got {self.attention_heads}")
        if self.patch_size < 1:
            problems.append(f"model.patch_size must be >= 1 (1 = no patching), got {self.patch_size}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (the patch, then one halving per level after the first)."""
        return self.patch_size * 2 ** (len(self.channel_mults) - 1)

    def check_image_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        if height < m or width < m or height % m or width % m:
            steps = [f"cuts the image into {self.patch_size}×{self.patch_size} patches"] if self.patch_size > 1 else []
            if len(self.channel_mults) > 1:
                steps.append(f"halves {'it' if steps else 'the image'} {len(self.channel_mults) - 1} times")
            raise ValueError(
                f"a U-Net with patch_size={self.patch_size} and channel_mults={self.channel_mults} "
                f"{' and '.join(steps)}, so height and width must be multiples of {m}; got {height}×{width}. "
                "Use a smaller patch_size, fewer channel_mults or pad the images."
            )


def group_norm(channels: int, min_group_size: int = 4) -> nn.GroupNorm:
    """GroupNorm with the most groups (≤ 32) that divide `channels` into groups of ≥ `min_group_size`.

    Groups of a single channel would be instance norm, which erases any per-channel offset.
    """
    groups = next((g for g in (32, 16, 8, 4, 2) if channels % g == 0 and channels // g >= min_group_size), 1)
    return nn.GroupNorm(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Start a residual branch at zero so every block begins as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, §3.5), [B] → [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GN → SiLU → conv → GN modulated by the embedding (scale, shift) → SiLU → dropout → conv, plus skip.

    Scale-shift conditioning (Nichol & Dhariwal 2021, §3 "use_scale_shift_norm") applies the time
    embedding after the normalisation, so no normalisation can remove it.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention channels {channels} not divisible by attention_heads={heads}")
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        # one copy into [3, B, heads, tokens, head_dim]: attention kernels are several times slower on
        # strided views (measured 3.6× for inference, 1.6× for training on CPU)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, tokens, head_dim]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks, each optionally followed by self-attention."""

    def __init__(self, blocks: list[ResBlock], attention: bool, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(
            [SelfAttention(b.conv2.out_channels, heads) if attention else nn.Identity() for b in blocks]
        )


class UNet(nn.Module):
    """ε_θ(x_t, t): [B, C, H, W] and LongTensor [B] → [B, C, H, W]."""

    def __init__(self, config: UNetConfig | None = None, **overrides) -> None:
        super().__init__()
        config = dataclasses.replace(config, **overrides) if config else UNetConfig(**overrides)
        self.config = config
        ch = config.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embedding = (
            nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes else None  # last row = "no class"
        )
        patch_channels = config.in_channels * config.patch_size ** 2  # channels of the space-to-depth input
        inputs = 2 if config.self_condition else 1  # x_t, and with self-conditioning the estimate of x0 beside it
        self.conv_in = nn.Conv2d(inputs * patch_channels, ch, 3, padding=1)

        skip_channels = [ch]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level, mult in enumerate(config.channel_mults):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(ch, config.base_channels * mult, emb_dim, config.dropout))
                ch = config.base_channels * mult
                skip_channels.append(ch)
            self.down.append(Level(blocks, level in config.attention_levels, config.attention_heads))
            last = level == len(config.channel_mults) - 1
            self.downsample.append(nn.Identity() if last else Downsample(ch))
            if not last:
                skip_channels.append(ch)

        self.mid1 = ResBlock(ch, ch, emb_dim, config.dropout)
        self.mid_attn = SelfAttention(ch, config.attention_heads)
        self.mid2 = ResBlock(ch, ch, emb_dim, config.dropout)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResBlock(ch + skip_channels.pop(), config.base_channels * mult, emb_dim, config.dropout))
                ch = config.base_channels * mult
            self.up.append(Level(blocks, level in config.attention_levels, config.attention_heads))
            self.upsample.append(Upsample(ch) if level > 0 else nn.Identity())

        self.norm_out = group_norm(ch)
        self.conv_out = zero_init(nn.Conv2d(ch, patch_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                x0_estimate: torch.Tensor | None = None) -> torch.Tensor:
        """ε̂ (or the configured target) for x_t; `x0_estimate` [B, C, H, W]: the previous estimate of x0 that a
        self-conditioning network also reads (None: zeros, "no estimate yet")."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"UNet expects [B, {self.config.in_channels}, H, W], got {tuple(x.shape)}")
        self.config.check_image_size(x.shape[2], x.shape[3])
        if self.config.self_condition:
            x = torch.cat([x, torch.zeros_like(x) if x0_estimate is None else x0_estimate.to(x.dtype)], dim=1)
        elif x0_estimate is not None:
            raise ValueError("this model was trained without self-conditioning; do not pass x0_estimate")
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(x.dtype))
        if self.class_embedding is not None:
            if class_labels is None:  # unconditional request to a conditional model: the "no class" token
                class_labels = torch.full_like(t, self.config.num_classes)
            emb = emb + self.class_embedding(class_labels)
        elif class_labels is not None:
            raise ValueError("this model is unconditional (trained without class conditioning); do not pass class labels")

        p = self.config.patch_size
        h = self.conv_in(F.pixel_unshuffle(x, p) if p > 1 else x)
        skips = [h]
        for level, down in zip(self.down, self.downsample):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for level, up in zip(self.up, self.upsample):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            h = up(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, p) if p > 1 else out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
