"""A training run's MLflow run gets MLflow's system metrics (CPU, memory) from the training process."""

from __future__ import annotations

import psutil
from mlflow import MlflowClient

from diffusion_core import load_config, train
from diffusion_core.tracking import mlflow_metrics_from_environ


def test_training_logs_system_metrics_to_its_run(smoke_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # several samples in a short training
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("system")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    with mlflow_metrics_from_environ(tmp_path / "run") as on_metrics:
        train(load_config("smoke", smoke_overrides), tmp_path / "run", progress=False, on_metrics=on_metrics)
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    memory = client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    assert cpu and memory
    assert all(0 <= m.value <= 100 for m in cpu)
    total_mb = psutil.virtual_memory().total / 1e6
    assert all(0 < m.value <= total_mb for m in memory)
    assert [m.step for m in memory] == list(range(len(memory)))  # one step per sample
