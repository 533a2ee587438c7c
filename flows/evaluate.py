"""evaluate: FID and the other sample-quality metrics of the run's samples, as MLflow metrics of the run.

Reads the uint8 sample tensors that `sample` logged (`samples/<tag>.safetensors`) and scores each
against the real test split with diffusion_core.evaluation. Metrics are named
`<metric>_<extractor>_<tag>` (e.g. `fid_lenet_ddim50`); what they depend on (extractor_id,
num_samples, dataset_sha256, reference split) becomes `eval.*` params; the whole result is also
kept as the artifact `evaluation.json`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from prefect import flow, get_run_logger
from safetensors.torch import load_file

from diffusion_core.evaluation import evaluate, format_table

from .sample import SAMPLES_ARTIFACT
from .tracking import log_metrics, log_params, run_config

RESULT_ARTIFACT = "evaluation.json"


@flow(name="evaluate")
def evaluate_samples(run_id: str, extractor: str = "lenet") -> None:
    """Score every sample tensor of the run with `extractor` ("lenet" offline, or "inception")."""
    client = MlflowClient()
    config = run_config(client, run_id)
    metrics: dict[str, float] = {}
    context: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(run_id, SAMPLES_ARTIFACT, tmp))
        for tensor_file in sorted(folder.glob("*.safetensors")):
            tag = tensor_file.stem
            result = evaluate(load_file(str(tensor_file))["images"], data=config.data, extractor=extractor, tag=tag,
                              device=config.train.device, progress=False)
            metrics.update({k: v for k, v in result.items() if k.endswith(f"_{tag}")})
            context.update({k: v for k, v in result.items() if not k.endswith(f"_{tag}")})
        if not metrics:
            raise RuntimeError(f"run {run_id} has no sample tensors under {SAMPLES_ARTIFACT}/: run `sample` first")
        result_file = Path(tmp) / RESULT_ARTIFACT
        result_file.write_text(json.dumps({**context, **metrics}, indent=2, sort_keys=True))
        client.log_artifact(run_id, str(result_file))
    log_metrics(client, run_id, metrics)
    log_params(client, run_id, {f"eval.{k}": v for k, v in context.items()})
    get_run_logger().info("evaluation (%s):\n%s", context.get("extractor_id"), format_table(metrics))
