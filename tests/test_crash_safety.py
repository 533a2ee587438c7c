"""Crash safety for real: SIGKILL mid-run, resume, and a kill in the middle of a checkpoint write."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open

from diffusion_core import load_config, train
from diffusion_core.checkpoint import CheckpointError, load_training_checkpoint


def saved_step(checkpoint) -> int:
    """The step in a checkpoint's metadata, without loading its tensors."""
    with safe_open(str(checkpoint), framework="pt") as f:
        return int(f.metadata()["step"])


def reported_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_equals_uninterrupted(smoke_overrides, tmp_path):
    """Killed after a report past its last checkpoint, then resumed: the same weights as an uninterrupted
    run, and metrics.jsonl holds every report once (those past the checkpoint are not doubled)."""
    overrides = {**smoke_overrides, "train.steps": 60, "train.checkpoint_every": 20, "train.log_every": 5,
                 "model.dropout": 0.1}
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "diffusion_core.cli", "train", "--preset", "smoke", "--run-dir", str(killed)]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / "checkpoints" / "last.safetensors"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.exists() and saved_step(checkpoint) >= 20 and max(reported_steps(killed)) > saved_step(checkpoint):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed; raise train.steps"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step_at_kill = load_training_checkpoint(checkpoint).step
    assert 20 <= step_at_kill < 60
    assert max(reported_steps(killed)) > step_at_kill  # reports the resumed run will write again

    config = load_config("smoke", overrides)
    train(config, killed, progress=False)  # resumes from the last checkpoint
    train(config, tmp_path / "straight", progress=False)
    a = load_training_checkpoint(checkpoint)
    b = load_training_checkpoint(tmp_path / "straight" / "checkpoints" / "last.safetensors")
    assert a.step == b.step == 60
    assert all(torch.equal(a.model[k], b.model[k]) for k in b.model)
    assert all(torch.equal(a.ema[k], b.ema[k]) for k in b.ema)
    assert reported_steps(killed) == reported_steps(tmp_path / "straight") == list(range(5, 61, 5))


def test_resume_drops_a_torn_last_report(smoke_overrides, tmp_path):
    """A kill while a report is being written leaves half a line at the end of metrics.jsonl; the resumed run
    drops it and holds every report once, each a whole line."""
    overrides = {**smoke_overrides, "train.steps": 10, "train.checkpoint_every": 10, "train.log_every": 5}
    train(load_config("smoke", overrides), tmp_path, progress=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 15, "loss": 0.2')  # step 15's report, cut short
    train(load_config("smoke", {**overrides, "train.steps": 20}), tmp_path, progress=False)
    assert reported_steps(tmp_path) == [5, 10, 15, 20]


def test_a_damaged_report_before_the_last_stops_the_resume(smoke_overrides, tmp_path):
    """Damage anywhere but at the end is no torn write: the resume refuses, naming the file and the line,
    and leaves the file as it was."""
    overrides = {**smoke_overrides, "train.steps": 10, "train.checkpoint_every": 10, "train.log_every": 5}
    train(load_config("smoke", overrides), tmp_path, progress=False)
    metrics = tmp_path / "metrics.jsonl"
    first, second = metrics.read_text().splitlines()
    damaged = f"{first[:7]}\n{second}\n"
    metrics.write_text(damaged)
    with pytest.raises(CheckpointError, match=f"{metrics}, line 1,"):
        train(load_config("smoke", {**overrides, "train.steps": 20}), tmp_path, progress=False)
    assert metrics.read_text() == damaged


def test_kill_during_write_keeps_previous_file(tmp_path):
    """A process killed halfway through an atomic write leaves the previous file untouched."""
    target = tmp_path / "last.safetensors"
    target.write_bytes(b"previous checkpoint")
    script = textwrap.dedent(f"""
        import os, signal
        from diffusion_core.atomic import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half of a new checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script])
    assert result.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"previous checkpoint"
