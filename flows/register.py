"""register-checkpoint: the exported EMA model as run artifacts and a new registered-model version.

The model folder (`model.safetensors` + `config.json`) becomes an MLflow `python_function` model
(diffusion_core.serving: the loader is this package's code, nothing is ever unpickled, the pip
requirements are pinned), is logged under the run's `model/` artifact path and registered from
`runs:/<run id>/model` as a new version of `ddpm-<dataset>` (class-conditional models:
`ddpm-<dataset>-cond`, tagged with num_classes, label_dropout and the default guidance), which gets
the alias `challenger`. Load any version with `mlflow.pyfunc.load_model("models:/ddpm-mnist@champion")`
or flows.registry.load_registered_model; versions registered before the flavor existed (an `MLmodel`
without flavors) load with the latter and are converted with `python -m flows.reregister`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tempfile
from collections.abc import Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.models import Model
from prefect import flow, get_run_logger

from diffusion_core.config import config_from_dict
from diffusion_core.serving import save_pyfunc_model

from .nightly import lineage_summary
from .registry import CHALLENGER
from .tracking import registered_model_name, upload_artifacts

MODEL_ARTIFACT = "model"
# run params copied onto the model version (when the run has them: config_sha256 is newer than the others)
VERSION_TAGS = ("dataset_sha256", "git_commit", "config_sha256")


def register_model_folder(client: MlflowClient, run_id: str, folder: Path, name: str,
                          tags: Mapping[str, str]) -> str:
    """Build the pyfunc model of the exported model in `folder`, log it as run `run_id`'s `model/`
    artifacts and register that as a new version of `name` with `tags`; return the version."""
    with tempfile.TemporaryDirectory() as tmp:
        staged = save_pyfunc_model(Path(tmp) / MODEL_ARTIFACT, folder, Model(artifact_path=MODEL_ARTIFACT, run_id=run_id))
        upload_artifacts(client, run_id, staged, MODEL_ARTIFACT)
        stored = {Path(item.path).name for item in client.list_artifacts(run_id, MODEL_ARTIFACT)}
        missing = sorted({p.name for p in staged.iterdir() if p.is_file()} - stored)
    if missing:  # never register a version whose files are not all in the store
        raise RuntimeError(f"run {run_id}: {', '.join(missing)} missing from the artifact store after upload; "
                           "nothing was registered")
    return str(mlflow.register_model(f"runs:/{run_id}/{MODEL_ARTIFACT}", name, tags=dict(tags)).version)


@flow(name="register-checkpoint")
def register_checkpoint(run_id: str, work_dir: str, config: dict[str, Any],
                        lineage: dict[str, str] | None = None) -> str:
    """Register `work_dir/model` (logged to the run) under the name `config` (as submitted) gives, with
    the `lineage` tags (flows.nightly), point `challenger` at it; return the new version."""
    client = MlflowClient()
    config = config_from_dict(config)
    params = client.get_run(run_id).data.params
    name = registered_model_name(config.data.dataset, config.conditional)
    conditioning = ({"num_classes": config.model.num_classes, "label_dropout": config.train.label_dropout,
                     "guidance": config.sample.guidance} if config.conditional else {"num_classes": "none"})
    version = register_model_folder(client, run_id, Path(work_dir) / MODEL_ARTIFACT, name,
                                    {"preset": config.name, **{k: params[k] for k in VERSION_TAGS if k in params},
                                     **{k: str(v) for k, v in conditioning.items()}, **(lineage or {})})
    if lineage:
        client.update_model_version(name, version, description=lineage_summary(lineage))
    client.set_registered_model_alias(name, CHALLENGER, version)
    get_run_logger().info("registered %s version %s (alias %s)", name, version, CHALLENGER)
    return version
