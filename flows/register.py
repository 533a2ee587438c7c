"""register-checkpoint: the exported EMA model as run artifacts and a new registered-model version.

The model folder (`model.safetensors` + `config.json`) gets an `MLmodel` description without
flavors (MLflow registers only folders that have one; nothing in it is ever unpickled), is logged
under the run's `model/` artifact path and registered from `runs:/<run id>/model` as a new version
of `ddpm-<dataset>` (class-conditional models: `ddpm-<dataset>-cond`, tagged with num_classes,
label_dropout and the default guidance), which gets the alias `challenger`. Load any version with
flows.registry.load_registered_model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.models import Model
from prefect import flow, get_run_logger

from diffusion_core.checkpoint import MODEL_FORMAT
from diffusion_core.config import config_from_dict

from .registry import CHALLENGER
from .tracking import registered_model_name, upload_artifacts

MODEL_ARTIFACT = "model"
VERSION_TAGS = ("dataset_sha256", "git_commit")  # run params copied onto the model version


@flow(name="register-checkpoint")
def register_checkpoint(run_id: str, work_dir: str, config: dict[str, Any]) -> str:
    """Log `work_dir/model` to the run, register it under the name `config` (as submitted) gives, point
    `challenger` at it; return the new version."""
    client = MlflowClient()
    config = config_from_dict(config)
    folder = Path(work_dir) / MODEL_ARTIFACT
    Model(artifact_path=MODEL_ARTIFACT, run_id=run_id, metadata={"format": MODEL_FORMAT}).save(folder / "MLmodel")
    upload_artifacts(client, run_id, folder, MODEL_ARTIFACT)
    stored = {Path(item.path).name for item in client.list_artifacts(run_id, MODEL_ARTIFACT)}
    missing = sorted({p.name for p in folder.iterdir() if p.is_file()} - stored)
    if missing:  # never register a version whose files are not all in the store
        raise RuntimeError(f"run {run_id}: {', '.join(missing)} missing from the artifact store after upload; "
                           "nothing was registered")
    params = client.get_run(run_id).data.params
    name = registered_model_name(config.data.dataset, config.conditional)
    conditioning = ({"num_classes": config.model.num_classes, "label_dropout": config.train.label_dropout,
                     "guidance": config.sample.guidance} if config.conditional else {"num_classes": "none"})
    version = mlflow.register_model(f"runs:/{run_id}/{MODEL_ARTIFACT}", name,
                                    tags={"preset": config.name, **{k: params[k] for k in VERSION_TAGS},
                                          **{k: str(v) for k, v in conditioning.items()}}).version
    client.set_registered_model_alias(name, CHALLENGER, version)
    get_run_logger().info("registered %s version %s (alias %s)", name, version, CHALLENGER)
    return str(version)
