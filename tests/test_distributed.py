"""DDP under torchrun with 2 gloo processes on the CPU: the same math as one process."""

import dataclasses
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusion_core import load_config, train
from diffusion_core.checkpoint import load_training_checkpoint
from diffusion_core.launch import (launch_training, rank_environment, run_process_group, torchrun_command,
                                   write_resolved_config)


@pytest.fixture()
def ddp_config(smoke_overrides):
    # no dropout: each rank draws its own dropout masks, which one process cannot reproduce
    return load_config("smoke", {**smoke_overrides, "model.dropout": 0.0, "train.steps": 6,
                                 "train.checkpoint_every": 3, "train.log_every": 3})


def _ckpt(run_dir: Path):
    return load_training_checkpoint(run_dir / "checkpoints" / "last.safetensors")


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "class-conditional"])
def test_two_ranks_equal_one_process(ddp_config, tmp_path, conditional):
    if conditional:  # label dropout is drawn for the global batch too
        ddp_config = dataclasses.replace(ddp_config, model=dataclasses.replace(ddp_config.model, num_classes=10),
                                         train=dataclasses.replace(ddp_config.train, label_dropout=0.5))
    lines = []
    assert launch_training(ddp_config, tmp_path / "ddp", 2, on_line=lines.append) == 0, "\n".join(lines[-30:])
    train(ddp_config, tmp_path / "single", progress=False)
    ddp, single = _ckpt(tmp_path / "ddp"), _ckpt(tmp_path / "single")
    assert ddp.step == single.step == 6
    worst = max((ddp.model[k] - single.model[k]).abs().max().item() for k in single.model)
    assert worst <= 1e-5, worst
    worst_ema = max((ddp.ema[k] - single.ema[k]).abs().max().item() for k in single.ema)
    assert worst_ema <= 1e-5, worst_ema
    # rank 0 alone reports: one metrics line per report, not one per rank
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["last.safetensors"]


def test_two_ranks_resume_from_saved_step(ddp_config, tmp_path):
    first = dataclasses.replace(ddp_config, train=dataclasses.replace(ddp_config.train, steps=3))
    assert launch_training(first, tmp_path, 2, on_line=lambda _: None) == 0
    assert _ckpt(tmp_path).step == 3
    lines = []
    assert launch_training(ddp_config, tmp_path, 2, on_line=lines.append) == 0
    assert _ckpt(tmp_path).step == 6
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]  # continued from step 3, did not start over


def test_failing_rank_fails_the_launch_quickly(ddp_config, tmp_path):
    config_file = write_resolved_config(ddp_config, tmp_path)
    cmd = torchrun_command(config_file, tmp_path, 2)
    module_at = cmd.index("-m", cmd.index("--standalone"))
    cmd[module_at:module_at + 2] = [str(Path(__file__).with_name("ddp_fault_worker.py"))]
    lines: list[str] = []
    start = time.monotonic()
    code, tail = run_process_group(cmd, rank_environment(2), lines.append)
    assert code != 0
    assert time.monotonic() - start < 120
    output = "\n".join(lines)
    assert "injected failure on rank 1" in output
    assert "rank" in output.lower()


def test_nproc_validation():
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        torchrun_command(Path("c.json"), Path("r"), 0)
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command(Path("c.json"), Path("r"), 1, nnodes=2)
    cmd = torchrun_command(Path("c.json"), Path("r"), "auto", nnodes=2, node_rank=1, rdzv_endpoint="h:29500")
    assert "--rdzv-endpoint=h:29500" in cmd and "--node-rank=1" in cmd and sys.executable == cmd[0]
    assert torch.cuda.device_count() > 0 or "--nproc-per-node=1" in cmd
