"""Process-group context detected from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environ(cls) -> "DistContext":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def resolve_device(name: str, ctx: DistContext) -> torch.device:
    """'auto' → this rank's GPU if there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and ctx.enabled:
        name = f"cuda:{ctx.local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device asks for CUDA but no GPU is visible; use train.device=cpu or auto")
    return device


def init_process_group(ctx: DistContext, device: torch.device, timeout_s: float = 300) -> None:
    """gloo on CPU, NCCL on CUDA. The timeout bounds how long a hung rank can stall the others."""
    if not ctx.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
