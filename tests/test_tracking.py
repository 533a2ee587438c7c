"""Training metrics in a real MLflow server: a server that dies mid-run neither stalls nor stops training,
and the run's metrics are complete once it is back; a resumed run does not send a step twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from diffusion_core import load_config, train
from diffusion_core.checkpoint import load_training_checkpoint
from diffusion_core.tracking import AsyncMlflowMetrics

pytestmark = pytest.mark.slow


class MlflowServer:
    """`mlflow server` on a free loopback port, in its own process group, that can be killed and restarted."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root, self.uri, self.proc = root, f"http://127.0.0.1:{self.port}", None

    def start(self, timeout_s: float = 180) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--default-artifact-root", str(self.root / "artifacts")]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        self.kill()
        raise TimeoutError("MLflow server did not become healthy")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture()
def server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    if server.proc.poll() is None:
        server.kill()


def reports(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_mlflow_dying_mid_run_neither_stops_training_nor_loses_metrics(server, smoke_overrides, tmp_path):
    overrides = {**smoke_overrides, "train.steps": 240, "train.log_every": 5, "train.checkpoint_every": 240}
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("metrics")).info.run_id
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "diffusion_core.cli", "train", "--preset", "smoke", "--run-dir", str(run_dir)]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    env = {**os.environ, "MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": server.uri}
    training = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: client.get_metric_history(run_id, "loss"), 120, "the first metrics in MLflow")
        server.kill()
        killed_at = reports(run_dir)[-1]["step"]
        assert killed_at < 120, "training got too far before the server was killed; raise train.steps"
        # 80 steps take over 10 s, longer than any pause of a synchronous flush
        wait_for(lambda: reports(run_dir)[-1]["step"] >= killed_at + 80 or training.poll() is not None, 60,
                 "training to go on without the server")
        assert training.poll() is None or training.returncode == 0
        server.start()
        out, err = training.communicate(timeout=300)
    finally:
        if training.poll() is None:
            training.kill()
    assert training.returncode == 0, err[-3000:]

    straight = tmp_path / "straight"
    train(load_config("smoke", overrides), straight, progress=False)
    a = load_training_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    b = load_training_checkpoint(straight / "checkpoints" / "last.safetensors")
    assert all(torch.equal(a.model[k], b.model[k]) for k in b.model)
    history = sorted((m.step, m.value) for m in MlflowClient(server.uri).get_metric_history(run_id, "loss"))
    assert history == [(r["step"], r["loss"]) for r in reports(run_dir)]
    assert [step for step, _ in history] == list(range(5, 241, 5))


def test_a_resumed_run_sends_each_step_once(server, smoke_overrides, tmp_path, monkeypatch):
    """Reports past the checkpoint were in MLflow before the crash; after the resume they are not sent again."""
    from diffusion_core.tracking import mlflow_metrics_from_environ

    overrides = {**smoke_overrides, "train.steps": 20, "train.log_every": 5, "train.checkpoint_every": 10}
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("resume")).info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    run_dir, early = tmp_path / "run", tmp_path / "early"
    with mlflow_metrics_from_environ(run_dir) as on_metrics:
        train(load_config("smoke", overrides), run_dir, progress=False, on_metrics=on_metrics)
    train(load_config("smoke", {**overrides, "train.steps": 10}), early, progress=False)
    # the state a crash after step 20 leaves when the last checkpoint is step 10's
    shutil.copy(early / "checkpoints" / "last.safetensors", run_dir / "checkpoints" / "last.safetensors")
    with mlflow_metrics_from_environ(run_dir) as on_metrics:
        train(load_config("smoke", overrides), run_dir, progress=False, on_metrics=on_metrics)
    for key in ("loss", "lr", "images_per_s"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [5, 10, 15, 20], key


IPYTHON_BEFORE_THE_THREAD = """
import sys, threading
from pathlib import Path
from diffusion_core.tracking import AsyncMlflowMetrics
seen = []
real_start = threading.Thread.start
def start(thread):
    seen.append((thread.name, "IPython" in sys.modules and hasattr(sys.modules["IPython"], "version_info")))
    real_start(thread)
threading.Thread.start = start
metrics = AsyncMlflowMetrics("0" * 32, Path(sys.argv[1]) / "metrics.jsonl", close_timeout_s=0.1)
print(dict(seen)["mlflow-metrics"])
"""


def test_ipython_is_imported_before_the_metrics_thread_starts(tmp_path):
    """MLflow's HTTP client imports IPython on its first request; from the metrics thread that import raced
    matplotlib's IPython check in the training thread (a real CI failure). It must be complete before the
    thread exists."""
    pytest.importorskip("IPython")
    done = subprocess.run([sys.executable, "-c", IPYTHON_BEFORE_THE_THREAD, str(tmp_path)], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})  # nothing listens
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "True"


class AnsweringServer(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that answers every request with one status and body, and counts them."""

    def __init__(self, status: int, body: str) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.requests += 1
                payload = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if body.startswith("{") else "text/plain")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.requests = 0
        self.uri = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


DELETED_RUN = json.dumps({"error_code": "INVALID_PARAMETER_VALUE",  # what MLflow answers for a deleted run
                          "message": "The run 0123 must be in the 'active' state. Current state is deleted."})


@pytest.mark.parametrize("status, body", [(400, DELETED_RUN), (403, "forbidden"), (404, "no such run")])
def test_a_permanent_refusal_stops_the_retries(status, body, tmp_path, monkeypatch, caplog):
    """A 4xx that retrying cannot change: the thread warns once and stops asking; reports still never raise."""
    server = AnsweringServer(status, body)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    metrics = AsyncMlflowMetrics("0123", tmp_path / "metrics.jsonl", close_timeout_s=5)
    metrics(5, {"loss": 0.5})
    wait_for(lambda: not metrics._thread.is_alive(), 20, "the metrics thread to give up")
    asked = server.requests
    metrics(10, {"loss": 0.4})  # training goes on
    time.sleep(3)  # a retrying thread would have asked again by now (backoff 2 s after the first failure)
    metrics.close()
    server.shutdown()
    assert server.requests == asked >= 1
    refusals = [r.getMessage() for r in caplog.records if r.name == "diffusion_core.tracking"]
    assert len(refusals) == 1 and f"HTTP {status}" in refusals[0] and "metrics.jsonl" in refusals[0]


@pytest.mark.parametrize("status", [429, 503])
def test_a_passing_refusal_is_retried(status, tmp_path, monkeypatch):
    """Too many requests, or a server error: the thread keeps trying."""
    server = AnsweringServer(status, "try again later")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    metrics = AsyncMlflowMetrics("0123", tmp_path / "metrics.jsonl", close_timeout_s=0.1)
    metrics(5, {"loss": 0.5})
    wait_for(lambda: server.requests >= 2, 20, "a second try")
    assert metrics._thread.is_alive()
    metrics.close()
    server.shutdown()
