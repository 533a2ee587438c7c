"""sample-model (flows/sample_model.py) on a trained smoke model registered into a test MLflow (SQLite, local
artifacts) under Prefect's test harness: the shards equal one process drawing the same seed in batches of
the shard size, after a SIGKILL only the missing shards are drawn, a two-worker Dask cluster gives the same
images, and parameters out of bounds are refused before any work."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from diffusion_core import ConfigError
from diffusion_core.checkpoint import load_model
from diffusion_core.config import SampleConfig
from diffusion_core.samplers import generate_batches
from flows.register import register_checkpoint
from flows.registry import CHAMPION
from flows.sample_model import sample_model
from flows.tracking import ensure_experiment, log_params

REPO = Path(__file__).resolve().parent.parent


def _register(client: MlflowClient, run_dir: Path, work: Path) -> str:
    """Register the model folder of a trained run as a new version (the pipeline's own step); make it champion."""
    shutil.copytree(run_dir / "model", work / "model")
    config = load_model(run_dir).config
    run_id = client.create_run(ensure_experiment(client, config.data.dataset)).info.run_id
    log_params(client, run_id, {"dataset_sha256": "f" * 64, "git_commit": "0" * 40})
    version = register_checkpoint(run_id, str(work), config.to_dict())
    name = "ddpm-mnist-cond" if config.conditional else "ddpm-mnist"
    client.set_registered_model_alias(name, CHAMPION, version)
    return version


@pytest.fixture(scope="module")
def registry(tmp_path_factory, smoke_run, smoke_cond_run):
    """MLflow on SQLite with local artifacts, Prefect's test harness, and the smoke models registered as
    ddpm-mnist and ddpm-mnist-cond (their champions)."""
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("sample_model")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        patch.setenv("DIFFUSION_ARTIFACT_LOCATION", str(root / "artifacts"))
        with prefect_test_harness(server_startup_timeout=120):
            client = MlflowClient()
            _register(client, smoke_run, root / "uncond")
            _register(client, smoke_cond_run, root / "cond")
            yield root


def _one_process(run_dir: Path, settings: SampleConfig, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Every image drawn in one go, in batches of the shard size (the library's own sampling loop)."""
    loaded = load_model(run_dir)
    return torch.cat(list(generate_batches(loaded.denoiser, loaded.denoiser.schedule, (1, 28, 28), settings,
                                           device="cpu", progress=False, class_labels=labels)))


def _shards(client: MlflowClient, run_id: str, tmp: Path) -> tuple[list[dict], list[dict]]:
    """(tensors, marker) of every shard of the run, in index order."""
    folder = Path(client.download_artifacts(run_id, "shards", str(tmp)))
    names = sorted(p.stem for p in folder.glob("shard-*.done"))
    assert {p.name for p in folder.iterdir()} == {f"{n}.{ext}" for n in names for ext in ("done", "safetensors", "png")}
    return [load_file(folder / f"{n}.safetensors") for n in names], [json.loads((folder / f"{n}.done").read_text())
                                                                     for n in names]


def _written(stored: Path) -> dict[str, int]:
    """Each stored shard file's modification time (ns): a shard drawn again is written again."""
    return {p.name: p.stat().st_mtime_ns for p in stored.iterdir()}


# Killed right after shard 1's tensors are in the store, before its contact sheet and marker.
KILL_AT_SHARD_1 = """
import os, signal
import flows.sample_model as m
upload = m.upload_artifacts
def upload_then_die(client, run_id, path, artifact_path=None):
    upload(client, run_id, path, artifact_path)
    if path.name == "shard-00001.safetensors":
        os.kill(os.getpid(), signal.SIGKILL)
m.upload_artifacts = upload_then_die
m.sample_model(model="ddpm-mnist", num_samples=10, shard_size=3, sampler="ddim", steps=3, seed=11)
"""


def test_a_killed_run_resumes_with_the_missing_shards_only_and_equals_one_process(registry, smoke_run, tmp_path):
    from prefect.settings import PREFECT_API_URL

    client = MlflowClient()
    killed = subprocess.run([sys.executable, "-c", KILL_AT_SHARD_1], cwd=REPO, timeout=300,
                            env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
    assert killed.returncode == -9
    (run,) = client.search_runs([ensure_experiment(client, "mnist")], "tags.`sample.key` != ''")
    assert run.info.status == "RUNNING"  # nobody ended it
    stored = Path(run.info.artifact_uri.removeprefix("file://")) / "shards"
    assert {p.name for p in stored.iterdir()} == {
        "shard-00000.safetensors", "shard-00000.png", "shard-00000.done", "shard-00001.safetensors"}
    before = _written(stored)

    assert sample_model(model="ddpm-mnist", num_samples=10, shard_size=3, sampler="ddim", steps=3, seed=11) == \
        run.info.run_id and client.get_run(run.info.run_id).info.status == "FINISHED"
    after = _written(stored)
    drawn = sorted({name.split(".")[0] for name in after if after[name] != before.get(name)})
    assert drawn == ["shard-00001", "shard-00002", "shard-00003"]  # shard 0 untouched, shard 1 drawn again

    tensors, markers = _shards(client, run.info.run_id, tmp_path)
    assert [len(t["images"]) for t in tensors] == [3, 3, 3, 1] and [m["images"] for m in markers] == [3, 3, 3, 1]
    expected = _one_process(smoke_run, SampleConfig(sampler="ddim", steps=3, seed=11, num_samples=10, batch_size=3))
    assert torch.equal(torch.cat([t["images"] for t in tensors]), expected)

    again = sample_model(model="ddpm-mnist", num_samples=10, shard_size=3, sampler="ddim", steps=3, seed=11)
    assert again == run.info.run_id and _written(stored) == after  # complete: nothing left to draw


def test_shards_on_a_two_worker_dask_cluster_equal_one_process(registry, smoke_cond_run, tmp_path):
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
    # A local Dask cluster writes OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_ and others into this process's
    # environment; every later test's subprocess would inherit them (other thread counts, other float sums).
    with mock.patch.dict(os.environ):
        run_id = sample_model.with_options(task_runner=runner)(
            model="ddpm-mnist-cond", num_samples=12, shard_size=4, steps=2, guidance=1.0, seed=5, classes=[1, 3])

    tensors, markers = _shards(MlflowClient(), run_id, tmp_path)
    labels = torch.tensor([1, 3] * 6)  # the classes asked for, in turn
    expected = _one_process(smoke_cond_run, SampleConfig(sampler="ddim", steps=2, guidance=1.0, seed=5,
                                                         num_samples=12, batch_size=4), labels)
    assert torch.equal(torch.cat([t["images"] for t in tensors]), expected)
    assert torch.equal(torch.cat([t["labels"] for t in tensors]), labels)
    workers = {m["worker"] for m in markers}
    assert len(workers) == 2 and f"{socket.gethostname()}:{os.getpid()}" not in workers


@pytest.mark.parametrize("request_, refused", [
    ({"num_samples": 50_001}, "parameter num_samples refused"), ({"num_samples": 0}, "parameter num_samples refused"),
    ({"shard_size": 4097}, "parameter shard_size refused"), ({"steps": 4001}, "parameter sample.steps refused"),
    ({"seed": -1}, "parameter sample.seed refused"), ({"sampler": "euler"}, "sample.sampler='euler' is unknown"),
    ({"model": "../ddpm"}, "parameter model refused"),
    ({"steps": 101}, "parameter steps refused: 101 exceeds the model's 100 timesteps"),  # the smoke model's T
    ({"classes": [3]}, "parameters classes and guidance refused: this version is unconditional"),
])
def test_out_of_bounds_requests_are_refused_before_any_work(registry, request_, refused):
    client = MlflowClient()
    runs = len(client.search_runs([ensure_experiment(client, "mnist")]))
    with pytest.raises(ConfigError, match=re.escape(refused)):
        sample_model(**{"model": "ddpm-mnist", "num_samples": 4, "shard_size": 2, **request_})
    assert len(client.search_runs([ensure_experiment(client, "mnist")])) == runs
