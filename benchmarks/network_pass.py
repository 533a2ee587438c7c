"""How many images one network pass should hold on this machine: the Denoiser's cost per image when a
batch goes through the network in passes of each size (diffusion_core.denoiser.CPU_IMAGES_PER_PASS), and
sampling images/s, unguided and guided, with and without that cap.

    python benchmarks/network_pass.py [--preset mnist-cpu-cond] [--batch 512] [--rounds 5]

Passes are timed in interleaved rounds (every size once per round, in turn), so drift on the machine reaches
all sizes alike; prints the median and range over rounds of ms per image, beside the fp32 matmul peak
measured before and after. The network is the preset's, freshly initialised: speed does not depend on the
weights. Then `generate_batches` (the preset's sampler and steps, sample.batch_size images per call) with the
cap and with passes of the whole batch (cap lifted), guided at w = 1 (a pass of twice the batch) and unguided.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffusion_core import denoiser as denoiser_module
from diffusion_core import load_config
from diffusion_core.checkpoint import build_denoiser
from diffusion_core.data import get_spec
from diffusion_core.runtime import matmul_gflops, tune_cpu_runtime
from diffusion_core.samplers import generate_batches


def ms_per_image(model, x, t, labels, images_per_pass: int) -> float:
    denoiser_module.CPU_IMAGES_PER_PASS = images_per_pass
    with torch.inference_mode():
        start = time.perf_counter()
        model(x, t, class_labels=labels)
    return (time.perf_counter() - start) / len(x) * 1e3


def sampling_images_per_s(model, config, shape, num_samples: int, guidance: float, images_per_pass: int) -> float:
    denoiser_module.CPU_IMAGES_PER_PASS = images_per_pass
    settings = config.sample.override(num_samples=num_samples, guidance=guidance, guidance_sweep=(), nfe_sweep=())
    labels = torch.arange(num_samples) % config.model.num_classes if config.conditional else None
    start = time.perf_counter()
    for _ in generate_batches(model, model.schedule, shape, settings, device="cpu", progress=False,
                              class_labels=labels):
        pass
    return num_samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mnist-cpu-cond")
    parser.add_argument("--batch", type=int, default=512, help="images handed to the Denoiser at once")
    parser.add_argument("--sizes", default="16,32,64,128,256,512", help="images per pass to time")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=512, help="images per sampling run (0: skip sampling)")
    args = parser.parse_args()
    tune_cpu_runtime()
    config = load_config(args.preset)
    spec = get_spec(config.data.dataset)
    shape = (spec.channels, spec.image_size, spec.image_size)
    model = build_denoiser(config).eval()
    torch.manual_seed(0)
    x, t = torch.randn(args.batch, *shape), torch.randint(0, config.diffusion.timesteps, (args.batch,))
    labels = torch.randint(0, config.model.num_classes, (args.batch,)) if config.conditional else None
    sizes = [int(s) for s in args.sizes.split(",")]
    cap = denoiser_module.CPU_IMAGES_PER_PASS
    print(f"preset {args.preset}, batch {args.batch}, torch threads {torch.get_num_threads()}, "
          f"fp32 matmul {matmul_gflops():.0f} GFLOP/s; the library's cap: {cap} images per pass")
    for size in sizes:  # warm-up
        ms_per_image(model, x, t, labels, size)
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(args.rounds):
        for size in sizes:
            times[size].append(ms_per_image(model, x, t, labels, size))
    for size in sizes:
        print(f"  passes of {size:5d}: {statistics.median(times[size]):.2f} ms/image "
              f"(range {min(times[size]):.2f}-{max(times[size]):.2f} over {args.rounds} rounds)")
    if args.samples:
        whole = 1 << 30
        for guidance in ([0.0, 1.0] if config.conditional else [0.0]):
            for _ in range(2):  # A B, A B
                capped = sampling_images_per_s(model, config, shape, args.samples, guidance, cap)
                uncapped = sampling_images_per_s(model, config, shape, args.samples, guidance, whole)
                print(f"  sampling {config.sample.sampler}-{config.sample.steps}, batch {config.sample.batch_size}, "
                      f"guidance {guidance:g}: {capped:.1f} images/s in passes of {cap}, {uncapped:.1f} in passes "
                      f"of the whole batch ({capped / uncapped:.2f}x)", flush=True)
    denoiser_module.CPU_IMAGES_PER_PASS = cap
    print(f"fp32 matmul after: {matmul_gflops():.0f} GFLOP/s")


if __name__ == "__main__":
    main()
