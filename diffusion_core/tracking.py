"""MLflow metrics from inside the training process, for runs started by an orchestrator.

The orchestrator creates the MLflow run and passes its id in MLFLOW_RUN_ID (and the server in
MLFLOW_TRACKING_URI). Rank 0 then logs every training report (loss, lr, images_per_s, …) by step,
buffered and sent in batches so that a slow tracking server never stalls the training loop.
mlflow is imported only when a run id is set.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

from .train import MetricsCallback

RUN_ID_ENV = "MLFLOW_RUN_ID"
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request


class BatchedMlflowMetrics:
    """A train() `on_metrics` callback that buffers metrics and sends them every `flush_every_s` seconds."""

    def __init__(self, run_id: str, flush_every_s: float = 10.0) -> None:
        from mlflow import MlflowClient

        self.run_id, self.flush_every_s = run_id, flush_every_s
        self._client = MlflowClient()
        self._pending: list = []
        self._last_flush = time.monotonic()

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self._pending += [Metric(key, float(value), now_ms, step) for key, value in metrics.items()]
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self._pending), MAX_BATCH):
            self._client.log_batch(self.run_id, metrics=self._pending[start:start + MAX_BATCH])
        self._pending.clear()
        self._last_flush = time.monotonic()


@contextlib.contextmanager
def mlflow_metrics_from_environ() -> Iterator[MetricsCallback | None]:
    """On rank 0 with MLFLOW_RUN_ID set: a batched MLflow callback, flushed on exit (also after an
    error, so the metrics up to a failure are kept). Otherwise None."""
    run_id = os.environ.get(RUN_ID_ENV)
    if not run_id or int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    callback = BatchedMlflowMetrics(run_id)
    try:
        yield callback
    finally:
        callback.flush()
