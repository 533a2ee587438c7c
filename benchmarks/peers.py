"""The project's U-Net side by side with a peer implementation of a comparable size, in one process.

    pip install -e '.[bench]'      # diffusers, for its UNet2DModel
    python benchmarks/peers.py --preset mnist-cpu [--batch-size 64] [--steps 10]

Both networks get the same input size, batch, optimizer (AdamW), loss (ε-MSE under the same noise
schedule) and sampler (DDIM-20 through this project's sampler). Printed: parameters, training
images/s and sampling image-evaluations/s for each, and the ratios ours / peer. The peer is
diffusers' UNet2DModel with the preset's channel widths, blocks per level and attention at the same
levels (its own GroupNorm groups, attention heads and up-blocks, so parameter counts differ a little).
"""

from __future__ import annotations

import argparse

import torch

from diffusion_core import load_config
from diffusion_core.checkpoint import build_denoiser
from diffusion_core.data import get_spec
from diffusion_core.forward import q_sample
from diffusion_core.runtime import tune_cpu_runtime
from diffusion_core.unet import count_parameters
from throughput import sampling_evals_per_s, seconds_per_call


def diffusers_unet(config):
    """UNet2DModel shaped like the preset's U-Net (widths, levels, blocks per level, attention levels)."""
    from diffusers import UNet2DModel

    m = config.model
    widths = tuple(m.base_channels * k for k in m.channel_mults)
    down = tuple("AttnDownBlock2D" if level in m.attention_levels else "DownBlock2D" for level in range(len(widths)))
    up = tuple("AttnUpBlock2D" if level in m.attention_levels else "UpBlock2D" for level in reversed(range(len(widths))))
    groups = max(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 and w // g >= 4 for w in widths))
    return UNet2DModel(sample_size=get_spec(config.data.dataset).image_size, in_channels=m.in_channels,
                       out_channels=m.in_channels, block_out_channels=widths, layers_per_block=m.num_res_blocks,
                       down_block_types=down, up_block_types=up, norm_num_groups=groups,
                       attention_head_dim=max(1, widths[-1] // m.attention_heads), dropout=m.dropout)


class PeerEps(torch.nn.Module):
    """(x_t, t) → ε̂ through the peer network, so it plugs into this project's sampler."""

    def __init__(self, net) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_t, t, **_):
        return self.net(x_t, t).sample


def measure(name: str, eps_model: torch.nn.Module, schedule, shape, steps: int, device) -> dict[str, float]:
    eps_model.to(device).train()
    optimizer = torch.optim.AdamW(eps_model.parameters(), lr=1e-4, fused=True)  # as in training
    x0 = torch.rand(shape, device=device) * 2 - 1

    def train_step() -> None:
        t = torch.randint(0, schedule.timesteps, (shape[0],), device=device)
        noise = torch.randn_like(x0)
        loss = torch.mean((eps_model(q_sample(schedule, x0, t, noise), t) - noise) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    images_per_s = shape[0] / seconds_per_call(train_step, device, steps)
    eps_model.eval()
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=False)
    evals = sampling_evals_per_s(eps_model, schedule, (min(256, 4 * shape[0]), *shape[1:]), device, amp)
    result = {"parameters": count_parameters(eps_model), "train_images_per_s": images_per_s, "evals_per_s": evals}
    print(f"{name:<28} {result['parameters']:>12,} {images_per_s:>16.1f} {evals:>18.1f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mnist-cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (after 2 warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    tune_cpu_runtime()  # as the project's entry points do, for both networks
    device = torch.device(args.device)
    config = load_config(args.preset, environ={})
    spec = get_spec(config.data.dataset)
    shape = (args.batch_size or config.train.batch_size, spec.channels, spec.image_size, spec.image_size)
    denoiser = build_denoiser(config)
    print(f"device: {device} ({torch.get_num_threads()} threads), preset {args.preset}, batch {shape[0]}, "
          f"torch {torch.__version__}")
    print(f"{'network':<28} {'parameters':>12} {'train images/s':>16} {'sampling evals/s':>18}")
    ours = measure("diffusion_core UNet", denoiser, denoiser.schedule, shape, args.steps, device)
    peer = measure("diffusers UNet2DModel", PeerEps(diffusers_unet(config)), denoiser.schedule, shape, args.steps,
                   device)
    print(f"ratio ours / peer: training {ours['train_images_per_s'] / peer['train_images_per_s']:.2f}×, "
          f"sampling {ours['evals_per_s'] / peer['evals_per_s']:.2f}×")


if __name__ == "__main__":
    main()
