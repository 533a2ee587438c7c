"""The allocator tuning must stop glibc from mapping and unmapping memory for every large tensor."""

import platform
import subprocess
import sys

import pytest

# Allocate, fill and free a 64 MiB tensor 20 times (above glibc's largest automatic mmap threshold,
# 32 MiB, so by default each one is a fresh mapping that page-faults as it is filled), and print
# the minor page faults taken by the loop.
_LOOP = """
import resource, sys, torch
from diffusion_core.runtime import tune_allocator
applied = tune_allocator() if sys.argv[1] == "tuned" else None
torch.ones(16 << 20)  # warm up: first touch of the heap
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(16 << 20)  # 16 Mi floats = 64 MiB
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _LOOP, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is for glibc's malloc")
def test_tuned_allocator_reuses_freed_memory_instead_of_faulting_it_in_again():
    _, default_faults = _page_faults("default")
    applied, tuned_faults = _page_faults("tuned")
    pages_per_tensor = (64 << 20) // 4096
    assert applied == "True"
    assert default_faults > 10 * pages_per_tensor  # a fresh mapping per tensor: ~20 × 16,384 faults
    assert tuned_faults <= 2 * pages_per_tensor  # freed blocks reused: at most a tensor or two of new pages
