"""The allocator tuning must stop glibc from mapping and unmapping memory in every training step."""

import platform
import subprocess
import sys

import pytest

# Minor page faults per training step of the mnist-cpu-v1 U-Net (1.03 M parameters, batch 64), after 3 warm-up steps.
_STEPS = """
import resource, sys, torch
from diffusion_core import load_config
from diffusion_core.checkpoint import build_denoiser
from diffusion_core.runtime import tune_allocator
applied = tune_allocator() if sys.argv[1] == "tuned" else None
torch.manual_seed(0)
denoiser = build_denoiser(load_config("mnist-cpu-v1", environ={}))
optimizer = torch.optim.AdamW(denoiser.net.parameters(), fused=True)
x0 = torch.rand(64, 1, 28, 28) * 2 - 1
def step():
    loss = denoiser.loss(x0, torch.randint(0, 1000, (64,)), torch.randn_like(x0))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _faults_per_step(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    applied, faults = out.stdout.split()
    return applied, float(faults)


# Elsewhere (macOS, musl) tune_allocator deliberately does nothing, so there is nothing to measure.
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is for glibc's malloc")
def test_tuned_allocator_reuses_freed_memory_in_training_steps():
    _, default_faults = _faults_per_step("default")
    applied, tuned_faults = _faults_per_step("tuned")
    assert applied == "True"
    assert default_faults > 1000  # fresh mappings for activations, faulted in page by page, every step
    assert tuned_faults < default_faults / 4, (tuned_faults, default_faults)
