"""Shared fixtures: real MNIST (copied, never unpacked in place), a prepared canonical file, a tiny trained run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PIPELINE_SECRET = "canary-secret-never-logged"  # the pipeline fixture's AWS secret: tests check it is never logged


def pytest_configure(config):
    """Under pytest-xdist (pyproject.toml: a worker per logical CPU, four at most, whole files each), each worker
    and every process it starts (training ranks, servers) gets an equal share of the cores: two PyTorch processes
    that each spin up threads for every core slow each other down many times over. Without workers (`-n 0`)
    nothing changes."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mnist_raw_source() -> Path:
    """The folder holding the four original MNIST .gz files (read-only is fine: nothing is written there).

    $DIFFUSION_DATA_SOURCE names it; without it the files are downloaded once into .cache/ (needs internet).
    """
    from diffusion_core.data import fetch_raw, get_spec

    if os.environ.get("DIFFUSION_DATA_SOURCE"):
        source = Path(os.environ["DIFFUSION_DATA_SOURCE"])
        if not (source / "train-images-idx3-ubyte.gz").is_file():
            pytest.fail(f"DIFFUSION_DATA_SOURCE={source} does not hold the MNIST raw .gz files")
        return source
    return fetch_raw(get_spec("mnist"), "download", REPO / ".cache")


@pytest.fixture(scope="session")
def mnist_raw_copy(mnist_raw_source, tmp_path_factory) -> Path:
    """A writable copy of the raw files, for tests that corrupt or remove them."""
    target = tmp_path_factory.mktemp("mnist_raw")
    for f in mnist_raw_source.glob("*.gz"):
        shutil.copy(f, target / f.name)
    return target


@pytest.fixture(scope="session")
def data_dir(mnist_raw_source, tmp_path_factory) -> Path:
    """A data folder holding the canonical MNIST file, prepared once per test session."""
    from diffusion_core.data import prepare_dataset

    folder = tmp_path_factory.mktemp("data")
    prepare_dataset("mnist", str(mnist_raw_source), folder)
    return folder


@pytest.fixture()
def smoke_overrides(mnist_raw_source, data_dir) -> dict:
    return {"data.source": str(mnist_raw_source), "data.data_dir": str(data_dir)}


@pytest.fixture(scope="session")
def smoke_run(mnist_raw_source, data_dir, tmp_path_factory) -> Path:
    """One trained smoke run (20 steps), shared by tests that only read it."""
    from diffusion_core import load_config, train

    run_dir = tmp_path_factory.mktemp("smoke_run")
    config = load_config("smoke", {"data.source": str(mnist_raw_source), "data.data_dir": str(data_dir)})
    train(config, run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="session")
def smoke_cond_run(mnist_raw_source, data_dir, tmp_path_factory) -> Path:
    """A trained class-conditional smoke run (20 steps), shared by tests that only read it."""
    from diffusion_core import load_config, train

    run_dir = tmp_path_factory.mktemp("smoke_cond_run")
    config = load_config("smoke", {"data.source": str(mnist_raw_source), "data.data_dir": str(data_dir),
                                   "model.num_classes": 10})
    train(config, run_dir, progress=False)
    return run_dir


@pytest.fixture()
def s3_endpoint(tmp_path, monkeypatch):
    """A real S3 endpoint on 127.0.0.1 (infra/s3_server.py, the stack's store) with an empty bucket `data`;
    the environment points boto3 at it (endpoint, credentials, region). Yields the endpoint URL."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(REPO / "infra" / "s3_server.py"), "--port", str(port),
                               "--state-dir", str(tmp_path / "s3-state"), "--bucket", "data"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for key, value in {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test-key",
                           "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        from diffusion_core.storage import s3_client

        deadline = time.monotonic() + 60
        while True:  # ready when the bucket answers (the server creates it after it starts listening)
            try:
                s3_client().head_bucket(Bucket="data")
                break
            except Exception:
                assert server.poll() is None and time.monotonic() < deadline, "the S3 server did not start"
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, mnist_raw_source, data_dir):
    """Environment of an embedded pipeline: data from the environment, MLflow and runs in a temporary
    folder, Prefect's test harness as the API."""
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("pipeline")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "DIFFUSION_RUNS_DIR": str(root / "runs"),
           "DIFFUSION_ARTIFACT_LOCATION": str(root / "artifacts"), "DIFFUSION_DATA_SOURCE": str(mnist_raw_source),
           "DIFFUSION_DATA_DIR": str(data_dir), "AWS_SECRET_ACCESS_KEY": PIPELINE_SECRET}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        with prefect_test_harness(server_startup_timeout=120):
            yield root


def grow_mnist_source(source: Path, target: Path, added: int) -> Path:
    """A new version of MNIST at `target`: the raw files of `source` with the first `added` training images
    (and labels) appended again, plus the MD5SUMS that makes it a version of its own. Returns `target`."""
    import gzip
    import hashlib
    import struct

    target.mkdir(parents=True, exist_ok=True)
    for f in source.glob("*.gz"):
        shutil.copy(f, target / f.name)
    for name, header in (("train-images-idx3-ubyte.gz", 16), ("train-labels-idx1-ubyte.gz", 8)):
        data = gzip.decompress((target / name).read_bytes())
        count = struct.unpack(">I", data[4:8])[0]
        item = (len(data) - header) // count
        grown = data[:4] + struct.pack(">I", count + added) + data[8:] + data[header:header + added * item]
        (target / name).write_bytes(gzip.compress(grown, compresslevel=1))  # level 9 takes 20 s
    sums = [f"{hashlib.md5(f.read_bytes()).hexdigest()}  {f.name}" for f in sorted(target.glob("*.gz"))]
    (target / "MD5SUMS").write_text("\n".join(sums) + "\n")
    return target
