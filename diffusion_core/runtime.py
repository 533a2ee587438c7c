"""Process-wide settings that make CPU training and sampling faster, applied where the network runs
(training, and `generate_batches`, which every sampling path goes through) and by the benchmarks.

Measured on a 2-core CPU (docs/performance.md, "Throughput"): with glibc's default malloc, every activation
larger than its mmap threshold is mapped fresh and unmapped when freed, so each training step pays
thousands of page faults in system time; and setting only the trim threshold is far worse (it pins
the mmap threshold at 128 KiB: 1.3 s of system time per `mnist-cpu` step). Both thresholds together
keep freed blocks in the process for reuse.
"""

from __future__ import annotations

import ctypes
import platform
import time

import torch

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # blocks below 32 MiB (every activation of the presets) come from the heap
TRIM_THRESHOLD_BYTES = 128 << 20  # up to 128 MiB of freed heap stays in the process for reuse

_tuned_allocator: bool | None = None


def tune_allocator() -> bool:
    """Fix glibc malloc's mmap and trim thresholds at the values above (same effect as the
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ environment variables, but applied in-process, so
    `diffusion train` gets it without a launcher). True if applied; False where the C library is not
    glibc (macOS, musl), whose allocators need no such setting. Idempotent."""
    global _tuned_allocator
    if _tuned_allocator is None:
        _tuned_allocator = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            libc = ctypes.CDLL(None)
            _tuned_allocator = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                                    and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _tuned_allocator


def tune_cpu_runtime() -> None:
    """Everything above, plus flushing subnormal floats to zero (Adam's squared tiny gradients and
    the last sampling steps produce them; x86 CPUs handle them on a slow path)."""
    tune_allocator()
    torch.set_flush_denormal(True)


def fast_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively: AMX (Intel's matrix tiles) or AVX512-BF16 (AMD Zen 4, Intel Cooper
    Lake and later). A guided teacher pass of 128 images took 75 ms in bf16 against fp32's 119 on a 2-core Xeon with
    AMX, and 255 against 376 ms on a 2-core EPYC with AVX512-BF16 (docs/performance.md); without either, bf16 is
    emulated and hundreds of times slower. PyTorch's own probes; one that is missing (older PyTorch) counts as no."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(bool(probe and probe()) for probe in probes)


def matmul_gflops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                  repeats: int = 10) -> float:
    """Dense n×n matmul GFLOP/s on `device` now: the yardstick printed beside every wall-clock figure
    (this kind of machine's speed drifts by up to 2× between days)."""
    device = torch.device(device)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9
