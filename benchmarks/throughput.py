"""Training and sampling throughput of a preset's model on this machine, against its matmul peak.

    python benchmarks/throughput.py --preset mnist-cpu [--batch-size 64] [--bf16] [--channels-last] [--compile]
        [--default-allocator] [--device cpu]

Prints: parameters; training images/s and achieved GFLOP/s (FLOPs counted by
torch.utils.flop_counter for one forward+backward); the machine's dense fp32 (and bf16) matmul
GFLOP/s measured in the same process, and the fraction of it reached; sampling network evaluations
per second and images/s for DDPM-1000, DDIM-50, DDIM-20 and DPM-Solver++(2M) at 20 and 10 steps
(one network evaluation per step for all of them, so measured once, on a DDIM-20 run). Then where
a training step's time goes (torch.profiler, self time of each op, grouped), and the GFLOP/s of the
convolutions alone: the ceiling for the whole step's fraction of the matmul peak.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from diffusion_core import load_config
from diffusion_core.checkpoint import build_denoiser
from diffusion_core.data import get_spec
from diffusion_core.runtime import matmul_gflops, tune_allocator
from diffusion_core.samplers import ddim_sample
from diffusion_core.unet import count_parameters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Mean wall seconds of `fn()` over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def sampling_evals_per_s(eps_model, schedule, shape: tuple[int, ...], device: torch.device, amp: dict,
                         steps: int = 20) -> float:
    """Image-evaluations per second of a DDIM run of `steps` steps on a batch of `shape`."""
    with torch.no_grad(), torch.autocast(**amp):
        seconds = seconds_per_call(lambda: ddim_sample(eps_model, schedule, shape, steps=steps, device=device),
                                   device, repeats=1, warmup=1)
    return shape[0] * steps / seconds


# Profiler op names (substrings) → category, first match wins; everything else is "other".
CATEGORIES = (("convolution", ("convolution",)), ("group norm", ("group_norm",)), ("SiLU", ("silu",)),
              ("attention", ("attention",)), ("linear layers", ("aten::mm", "aten::addmm", "aten::bmm")),
              ("optimizer", ("adam",)))


def time_breakdown(step, device: torch.device, steps: int = 3) -> dict[str, float]:
    """Seconds per call of `step()` by op category: the self time of each aten op (device time on a GPU)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    seconds = dict.fromkeys([name for name, _ in CATEGORIES] + ["other"], 0.0)
    for event in prof.key_averages():
        self_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        category = next((name for name, keys in CATEGORIES if any(k in event.key for k in keys)), "other")
        seconds[category] += self_us / 1e6 / steps
    return seconds


def conv_flops(counter: FlopCounterMode) -> int:
    """FLOPs of the convolutions (forward and backward) in a FlopCounterMode's global counts."""
    return sum(n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mnist-cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (after 3 warm-up)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights (activations follow them)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training loss (compile time reported)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc malloc's thresholds alone (what the project's entry points change)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.set_flush_denormal(True)
    allocator = "default malloc" if args.default_allocator else f"malloc tuned: {tune_allocator()}"
    device = torch.device(args.device)
    config = load_config(args.preset, environ={})
    spec = get_spec(config.data.dataset)
    batch = args.batch_size or config.train.batch_size
    shape = (batch, spec.channels, spec.image_size, spec.image_size)
    denoiser = build_denoiser(config).to(device)
    net = denoiser.net
    net.to(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)  # as in training
    x0 = torch.rand(shape, device=device) * 2 - 1  # NCHW, as training feeds it; activations follow the weights
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)

    loss_fn = torch.compile(denoiser.loss) if args.compile else denoiser.loss

    def train_step() -> None:
        t = torch.randint(0, denoiser.schedule.timesteps, (batch,), device=device)
        with torch.autocast(**amp):
            loss = loss_fn(x0, t, torch.randn_like(x0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    first_step_s = seconds_per_call(train_step, device, repeats=1, warmup=0)  # includes any compilation
    with FlopCounterMode(display=False) as counter:
        (denoiser.loss(x0, torch.zeros(batch, dtype=torch.long, device=device), x0)).backward()
    flops_per_step, conv_flops_per_step = counter.get_total_flops(), conv_flops(counter)
    optimizer.zero_grad(set_to_none=True)
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    step_s = seconds_per_call(train_step, device, args.steps, warmup=2)
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    steps_run = args.steps + 2  # the 2 warm-up calls included
    user_ms, sys_ms = ((getattr(cpu_after, f) - getattr(cpu_before, f)) / steps_run * 1000 for f in ("ru_utime", "ru_stime"))

    breakdown = time_breakdown(train_step, device)
    size = 8192 if device.type == "cuda" else 2048  # a GPU needs large products to reach its peak
    peak32 = matmul_gflops(device, torch.float32, n=size)
    peak16 = matmul_gflops(device, torch.bfloat16, n=size) if args.bf16 else None
    achieved = flops_per_step / step_s / 1e9
    peak = peak16 if args.bf16 else peak32

    net.eval()
    sample_batch = min(256, batch * 4)
    evals_per_s = sampling_evals_per_s(denoiser, denoiser.schedule, (sample_batch, *shape[1:]), device, amp)

    print(f"device: {device} ({torch.get_num_threads()} threads), preset {args.preset}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}{', channels_last' if args.channels_last else ''}"
          f"{', torch.compile' if args.compile else ''}, {allocator}, torch {torch.__version__}")
    print(f"parameters:                   {count_parameters(net):,}")
    print(f"training batch:               {batch} images {tuple(shape[1:])}")
    print(f"training:                     {batch / step_s:8.1f} images/s   ({step_s * 1000:.0f} ms/step)")
    print(f"CPU time per step:            {user_ms:8.0f} ms user, {sys_ms:.0f} ms system (all threads)")
    print(f"first step (incl. compile):   {first_step_s:8.1f} s")
    print(f"training FLOPs per image:     {flops_per_step / batch / 1e9:8.3f} GFLOP (forward + backward)")
    print(f"achieved:                     {achieved:8.1f} GFLOP/s")
    print(f"dense matmul peak fp32:       {peak32:8.1f} GFLOP/s")
    if peak16:
        print(f"dense matmul peak bf16:       {peak16:8.1f} GFLOP/s")
    print(f"fraction of matmul peak:      {achieved / peak:8.1%}")
    print(f"sampling (batch {sample_batch}):         {evals_per_s:8.1f} image-evaluations/s")
    for name, evals in (("DDPM-1000", 1000), ("DDIM-50", 50), ("DDIM-20", 20), ("DPM++2M-20", 20), ("DPM++2M-10", 10)):
        print(f"  {name:10s}                  {evals_per_s / evals:8.2f} images/s")
    profiled = sum(breakdown.values())
    print(f"training step by op (profiled, {profiled * 1000:.0f} ms/step):")
    for name, seconds in breakdown.items():
        print(f"  {name:14s}              {seconds / profiled:8.1%}   ({seconds * 1000:.0f} ms)")
    conv_rate = conv_flops_per_step / breakdown["convolution"] / 1e9
    print(f"convolutions alone:           {conv_rate:8.1f} GFLOP/s = {conv_rate / peak:.1%} of matmul peak "
          f"({conv_flops_per_step / flops_per_step:.1%} of the FLOPs)")


if __name__ == "__main__":
    main()
