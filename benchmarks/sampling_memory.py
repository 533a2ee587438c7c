"""Peak memory of sampling and evaluating N images: it should not grow with N beyond the uint8 images.

    python benchmarks/sampling_memory.py [--model runs/mnist-cpu/model] [--sizes 1000 10000] [--steps 2]

Each measurement is a fresh `diffusion sample` / `diffusion evaluate` process; its peak resident set
size (the kernel's ru_maxrss for that child) is printed with its wall time. Images are generated in
batches of `--batch-size` and kept only as uint8 (784 bytes per MNIST image, 7.8 MB for 10,000), so
peak memory should stay nearly flat from 1,000 to 10,000. Without `--model`, an untrained model of
the preset is used: memory does not depend on the weights, and `--steps` only changes the time.
Evaluation needs the prepared dataset (data settings from the model's config or $DIFFUSION_DATA_*).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one child process; raises if it fails."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {child.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def untrained_model(preset: str, folder: Path) -> Path:
    from diffusion_core import load_config
    from diffusion_core.checkpoint import build_denoiser, export_model

    config = load_config(preset)
    torch.manual_seed(0)
    return export_model(folder / "model", build_denoiser(config).net, config, {"step": 0})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="exported model folder (default: an untrained model of --preset)")
    parser.add_argument("--preset", default="mnist-cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps per image")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--skip-evaluate", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else untrained_model(args.preset, Path(tmp))
        cli = [sys.executable, "-m", "diffusion_core.cli"]
        common = ["--model", str(model), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                  "--device", "cpu"]
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
        print(f"{'N':>8} {'command':<10} {'peak RSS (MiB)':>15} {'wall (s)':>10}")
        for n in args.sizes:
            rss, wall = peak_rss([*cli, "sample", *common, "-n", str(n), "--tensor-out", str(Path(tmp) / "s.safetensors")])
            print(f"{n:>8} {'sample':<10} {rss:>15.0f} {wall:>10.1f}", flush=True)
            if not args.skip_evaluate:
                rss, wall = peak_rss([*cli, "evaluate", *common, "-n", str(n)])
                print(f"{n:>8} {'evaluate':<10} {rss:>15.0f} {wall:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
