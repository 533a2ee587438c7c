"""train: torchrun in its own process group, its rank-tagged output in the Prefect log, its files in MLflow.

The ranks log loss, lr and images/s by step to the MLflow run themselves (rank 0, asynchronously: see
diffusion_core.tracking); this flow passes the run id and the tracking URI in their environment.
If the flow run is cancelled (Prefect turns the runner's SIGTERM into an exception here), the whole
process group is terminated, so no rank outlives it. A non-zero exit fails the flow with the tail
of the log.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from prefect import flow, get_run_logger

from diffusion_core.launch import (prepare_for_ranks, rank_environment, resolve_nproc, run_process_group,
                                   torchrun_command, write_resolved_config)
from diffusion_core.tracking import RUN_ID_ENV
from diffusion_core.train import CHECKPOINT

from diffusion_core.config import config_from_dict

from .tracking import upload_artifacts

# Files of the run folder kept as run artifacts (the exported model is registered by register-checkpoint).
TRAINING_ARTIFACTS = ("forward_process.png", "loss_curve.png", "metrics.jsonl")


class TrainingFailed(RuntimeError):
    """torchrun exited with a non-zero code; the message ends with the last lines of its output."""


@flow(name="train")
def train_model(run_id: str, work_dir: str, config: dict[str, Any], nproc_per_node: int | str = 1,
                continue_from: str | None = None, allow_new_data: bool = False) -> float:
    """Train the run's `config` (as submitted) in `work_dir` with `nproc_per_node` ranks (resuming a
    checkpoint there; else continuing the training state file `continue_from`, on new data only with
    `allow_new_data`). Returns the training's wall-clock seconds, also the run's metric `train_seconds`."""
    logger = get_run_logger()
    client = MlflowClient()
    run_dir = Path(work_dir)
    config = config_from_dict(config)
    prepare_for_ranks(config)  # normally done already (prepare-dataset); the ranks get no storage credentials
    config_file = write_resolved_config(config, run_dir)
    cmd = torchrun_command(config_file, run_dir, nproc_per_node, log_dir=run_dir / "torchrun",
                           continue_from=continue_from, allow_new_data=allow_new_data)
    env = {**rank_environment(resolve_nproc(nproc_per_node)),
           RUN_ID_ENV: run_id, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    logger.info("launching %s", " ".join(cmd))
    started = time.perf_counter()
    code, tail = run_process_group(cmd, env, on_line=lambda line: _log_line(logger, line))
    seconds = time.perf_counter() - started
    if code != 0:
        raise TrainingFailed(f"torchrun exited with code {code}; last lines:\n" + "\n".join(tail))
    for name in TRAINING_ARTIFACTS:
        upload_artifacts(client, run_id, run_dir / name)
    upload_artifacts(client, run_id, run_dir / CHECKPOINT, CHECKPOINT.parent.as_posix())
    client.log_metric(run_id, "train_seconds", seconds)
    return seconds


def _log_line(logger, line: str) -> None:
    """Forward one output line; progress-bar redraws leave lines holding only a rank tag, skip those."""
    text = line.strip()
    if text and not (text.startswith("[rank") and text.endswith("]:")):
        logger.info(line)
