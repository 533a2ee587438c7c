"""MLflow conventions of the pipeline: experiment and model names, run creation, reading a run back.

The tracking server is MLFLOW_TRACKING_URI (unset: MLflow's default, a SQLite file `mlflow.db` in
the working folder with artifacts beside it). New experiments keep their artifacts under
DIFFUSION_ARTIFACT_LOCATION (e.g. s3://bucket/mlflow, written through boto3 with
MLFLOW_S3_ENDPOINT_URL and the AWS_* credentials) when it is set; otherwise where the server says
(a server started with --artifacts-destination proxies them, so clients need no S3 credentials).
Only configuration, versions and results are logged: never the environment or credentials.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from diffusion_core.storage import with_retries

ARTIFACT_LOCATION_ENV = "DIFFUSION_ARTIFACT_LOCATION"
REPO_ROOT = Path(__file__).resolve().parent.parent
BATCH = 100  # MLflow accepts at most 100 params (or tags) per log_batch request


def experiment_name(dataset: str) -> str:
    """One experiment per dataset."""
    return f"diffusion-{dataset}"


def registered_model_name(dataset: str, conditional: bool = False) -> str:
    """One registered model per dataset and kind (`ddpm-mnist`, class-conditional `ddpm-mnist-cond`);
    each train-eval run adds a version, and each kind has its own champion."""
    return f"ddpm-{dataset}-cond" if conditional else f"ddpm-{dataset}"


def ensure_experiment(client: MlflowClient, dataset: str) -> str:
    """The dataset's experiment id, creating the experiment on first use."""
    name = experiment_name(dataset)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    root = os.environ.get(ARTIFACT_LOCATION_ENV)
    try:
        return client.create_experiment(name, artifact_location=f"{root.rstrip('/')}/{name}" if root else None)
    except MlflowException as exc:  # another run created it in the meantime
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(items), BATCH):
        client.log_batch(run_id, params=items[start:start + BATCH])


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    items = [RunTag(key, str(value)) for key, value in tags.items()]
    for start in range(0, len(items), BATCH):
        client.log_batch(run_id, tags=items[start:start + BATCH])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    now_ms = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now_ms, step) for key, value in metrics.items()])


TRANSFER_ATTEMPTS = 4  # tries per artifact transfer, 0.5 s, 1 s, 2 s apart (on top of the S3 client's own retries)


def upload_artifacts(client: MlflowClient, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a folder's files as run artifacts, with bounded retries and backoff; then a clear error.

    A failed upload raises, so the flow fails before anything downstream (registration, champion)
    can point at it.
    """
    local_path = Path(local_path)
    if local_path.is_dir():
        log, what = client.log_artifacts, artifact_path or "the run's artifacts"
    else:
        log, what = client.log_artifact, "/".join(filter(None, (artifact_path, local_path.name)))
    try:
        with_retries(lambda: log(run_id, str(local_path), artifact_path),
                     f"upload of {what} to the artifact store of run {run_id}", attempts=TRANSFER_ATTEMPTS)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}. Check that the artifact store is reachable (S3 endpoint, MLflow server) "
                           "and re-run.") from exc


def git_commit(repo: Path = REPO_ROOT) -> str:
    """The checked-out commit, read from `.git` (no git process); $GIT_COMMIT where there is no
    checkout (an image), else "unknown"."""
    git = repo / ".git"
    try:
        if git.is_file():  # a worktree: ".git" names the real folder
            git = (repo / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head  # detached HEAD
        ref = head.removeprefix("ref: ")
        common = (git / (git / "commondir").read_text().strip()) if (git / "commondir").is_file() else git
        if (common / ref).is_file():
            return (common / ref).read_text().strip()
        for line in (common / "packed-refs").read_text().splitlines():
            if line.endswith(f" {ref}"):
                return line.split()[0]
    except OSError:
        pass
    return os.environ.get("GIT_COMMIT") or "unknown"


@contextlib.contextmanager
def ended_when_done(client: MlflowClient, run_id: str) -> Iterator[None]:
    """End the MLflow run FINISHED when the block completes, FAILED on an exception, KILLED when the flow
    run is cancelled (that arrives as a BaseException); the exception goes on."""
    try:
        yield
    except BaseException as exc:
        client.set_terminated(run_id, "FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    client.set_terminated(run_id, "FINISHED")
