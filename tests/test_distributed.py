"""DDP under torchrun with 2 gloo processes on the CPU: the same math as one process."""

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
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


SECRETS = {"AWS_ACCESS_KEY_ID": "canary-aws-key-id", "AWS_SECRET_ACCESS_KEY": "canary-aws-secret",
           "AWS_SESSION_TOKEN": "canary-aws-session", "GITHUB_TOKEN": "canary-github",
           "OPENAI_API_KEY": "canary-api", "DATABASE_PASSWORD": "canary-db", "SIGNING_SECRET": "canary-signing",
           "UNRELATED_SETTING": "canary-other"}
# MLflow's tracking credentials are what rank 0's metrics thread logs with: the one credential ranks get.
TRAINING_NEEDS = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "MLFLOW_RUN_ID": "0" * 32,
                  "DIFFUSION_DATA_DIR": "data", "MLFLOW_TRACKING_PASSWORD": "tracking-password",
                  "MLFLOW_TRACKING_TOKEN": "tracking-token"}
# Each rank writes its environment to a file of its own: ranks run unbuffered (launch.RANK_ENV), so lines they print
# at the same moment can interleave on the shared pipe.
SAVE_ENVIRONMENT = ("import json, os, pathlib\n"
                    "here = pathlib.Path(__file__).parent\n"
                    "(here / f\"env-{os.environ['RANK']}.json\").write_text(json.dumps(dict(os.environ)))\n")


def test_ranks_see_no_secrets(ddp_config, tmp_path, monkeypatch):
    """Every rank (a fresh process under torchrun) gets what training reads, and no other credential of the
    launcher."""
    for name, value in {**SECRETS, **TRAINING_NEEDS}.items():
        monkeypatch.setenv(name, value)
    script = tmp_path / "save_environment.py"
    script.write_text(SAVE_ENVIRONMENT)
    cmd = torchrun_command(write_resolved_config(ddp_config, tmp_path), tmp_path, 2)
    module_at = cmd.index("-m", cmd.index("--standalone"))
    cmd[module_at:module_at + 2] = [str(script)]
    lines: list[str] = []
    code, _ = run_process_group(cmd, rank_environment(2), lines.append)
    assert code == 0, "\n".join(lines[-30:])
    seen = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("env-*.json"))]
    assert sorted(env["RANK"] for env in seen) == ["0", "1"]
    for env in seen:
        assert not set(SECRETS) & set(env) and not set(SECRETS.values()) & set(env.values())
        assert {name: env.get(name) for name in TRAINING_NEEDS} == TRAINING_NEEDS
        assert (env["PATH"], env.get("PYTHONPATH")) == (os.environ["PATH"], os.environ.get("PYTHONPATH"))


def test_ranks_train_from_an_s3_source_without_its_credentials(ddp_config, mnist_raw_source, tmp_path, monkeypatch):
    """The launcher fetches the dataset with its credentials; the ranks, which have none, read the prepared file."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for name in ("DIFFUSION_DATA_SOURCE", "DIFFUSION_DATA_DIR"):  # would override the config's S3 source
            monkeypatch.delenv(name, raising=False)
        for name, value in {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "launcher-key",
                            "AWS_SECRET_ACCESS_KEY": "launcher-secret", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        bucket = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        bucket.create_bucket(Bucket="data")
        for raw in mnist_raw_source.glob("*.gz"):
            bucket.upload_file(str(raw), "data", f"mnist/{raw.name}")
        config = dataclasses.replace(ddp_config, data=dataclasses.replace(
            ddp_config.data, source="s3://data/mnist", data_dir=str(tmp_path / "data")))
        lines: list[str] = []
        assert launch_training(config, tmp_path / "run", 2, on_line=lines.append) == 0, "\n".join(lines[-30:])
    finally:
        server.stop()
    assert _ckpt(tmp_path / "run").step == 6


def _start_nodes(config_file: Path, tmp_path: Path) -> list[subprocess.Popen]:
    """Two torchrun launchers, one process each, meeting by c10d rendezvous on 127.0.0.1 (as two machines
    would at node 0's address); each in its own process group, its output in node<r>.log. Node 1 starts
    once node 0 listens, so node 0 hosts the rendezvous store, as on two machines."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    for rank in (0, 1):
        cmd = torchrun_command(config_file, tmp_path / f"node{rank}", 1, nnodes=2, node_rank=rank,
                               rdzv_endpoint=f"127.0.0.1:{port}", rdzv_id=f"test-{port}")
        with open(tmp_path / f"node{rank}.log", "wb") as log:
            nodes.append(subprocess.Popen(cmd, env=rank_environment(1), stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = time.monotonic() + 120
        while rank == 0 and not _listening(port):
            assert time.monotonic() < deadline and nodes[0].poll() is None, _logs(tmp_path)
            time.sleep(0.2)
    return nodes


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process below it (torchrun starts its workers in sessions of their own)."""
    parents, family = {}, {node.pid}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # exited meanwhile
            pass
    while grown := {pid for pid, parent in parents.items() if parent in family} - family:
        family |= grown
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node.wait()


def _stop(nodes: list[subprocess.Popen]) -> None:
    for node in nodes:
        if node.poll() is None:
            _kill_node(node)


def _logs(tmp_path: Path) -> str:
    return "\n".join(log.read_text()[-2000:] for log in sorted(tmp_path.glob("node*.log")))


@pytest.mark.slow
def test_two_nodes_on_loopback_equal_one_process(ddp_config, tmp_path):
    nodes = _start_nodes(write_resolved_config(ddp_config, tmp_path), tmp_path)
    try:
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        _stop(nodes)
    assert codes == [0, 0], _logs(tmp_path)
    train(ddp_config, tmp_path / "single", progress=False)
    two_nodes, single = _ckpt(tmp_path / "node0"), _ckpt(tmp_path / "single")  # global rank 0 writes on node 0
    assert two_nodes.step == single.step == 6
    worst = max((two_nodes.model[k] - single.model[k]).abs().max().item() for k in single.model)
    assert worst <= 1e-5, worst


@pytest.mark.slow
def test_a_dead_node_fails_the_other_within_a_minute(ddp_config, tmp_path):
    long = dataclasses.replace(ddp_config, train=dataclasses.replace(ddp_config.train, steps=100_000))
    nodes = _start_nodes(write_resolved_config(long, tmp_path), tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "node0" / "metrics.jsonl").is_file():  # both nodes are training together
            assert time.monotonic() < deadline and nodes[0].poll() is None, _logs(tmp_path)
            time.sleep(0.2)
        _kill_node(nodes[1])
        killed = time.monotonic()
        code = nodes[0].wait(timeout=120)
        assert code != 0 and time.monotonic() - killed < 60, _logs(tmp_path)
        assert "RendezvousConnectionError" not in _logs(tmp_path)  # node 0's store outlived node 1: the training failed
    finally:
        _stop(nodes)


def test_nproc_validation():
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        torchrun_command(Path("c.json"), Path("r"), 0)
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command(Path("c.json"), Path("r"), 1, nnodes=2)
    cmd = torchrun_command(Path("c.json"), Path("r"), "auto", nnodes=2, node_rank=1, rdzv_endpoint="h:29500")
    assert "--rdzv-endpoint=h:29500" in cmd and "--node-rank=1" in cmd and sys.executable == cmd[0]
    assert torch.cuda.device_count() > 0 or "--nproc-per-node=1" in cmd
