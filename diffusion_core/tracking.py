"""MLflow metrics from inside the training process, for runs started by an orchestrator.

The orchestrator creates the MLflow run and passes its id in MLFLOW_RUN_ID (and the server in
MLFLOW_TRACKING_URI). Rank 0 then logs every training report (loss, lr, images_per_s, …) by step.
Metrics never stop training: a report goes into a bounded queue (never waiting), and a background
thread sends what has accumulated about once a second. When the server is down or slow, training
goes on, the thread warns once and retries with backoff; reports that do not fit in the queue or
its pending list are read back from metrics.jsonl (which train() writes first) when it returns.
Steps the run already holds in MLflow (reported before a crash, again after the resume) are not
sent twice. At the end the thread gets `close_timeout_s` to deliver the rest; whatever is still
unsent is named in a warning and stays in metrics.jsonl. A refusal that retrying cannot change (an
HTTP 4xx such as a deleted run, a bad value or no permission; not one of RETRIED_CLIENT_ERRORS) ends
the sending: the thread warns once and stops, training goes on, every report stays in metrics.jsonl.
mlflow is imported only when a run id is set.

Rank 0 also runs MLflow's system-metrics monitor for the run (`system/cpu_utilization_percentage`,
`system/system_memory_usage_megabytes`, disk and network; GPU utilisation and memory where the
`pynvml` package is installed, which the project does not require), every SYSTEM_METRICS_EVERY_S
seconds unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise. Like the training metrics it
never stops training: a monitor that cannot start is a warning, and one that loses the server stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .train import MetricsCallback

RUN_ID_ENV = "MLFLOW_RUN_ID"
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request
QUEUE_SIZE = 1000  # reports waiting for the thread
MAX_PENDING = 10_000  # reports the thread holds while the server is away; beyond, metrics.jsonl is the backlog
SEND_EVERY_S = 1.0
MAX_BACKOFF_S = 30.0
RETRIED_CLIENT_ERRORS = (408, 429, 499)  # HTTP 4xx that mean "later": request timeout, too many requests, cancelled
SYSTEM_METRICS_EVERY_S = 10.0
log = logging.getLogger(__name__)


class AsyncMlflowMetrics:
    """A train() `on_metrics` callback that never blocks or raises: see the module docstring."""

    def __init__(self, run_id: str, metrics_file: Path, close_timeout_s: float = 60.0) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # this thread retries; mlflow's own
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")     # backoff would hold a batch for minutes
        from mlflow import MlflowClient

        with contextlib.suppress(ImportError):
            # MLflow's HTTP client imports IPython on its first request (Databricks notebook detection);
            # done by the metrics thread, that import raced matplotlib's IPython check in the training
            # thread and failed runs ("partially initialized module 'IPython'"). Import it here first.
            import IPython  # noqa: F401

        self.run_id, self.metrics_file, self.close_timeout_s = run_id, metrics_file, close_timeout_s
        self._client = MlflowClient()
        self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self._pending: dict[int, dict[str, float]] = {}
        self._logged: set[int] | None = None  # steps the run holds in MLflow (read at the first contact)
        self._backlog = False  # some reports were dropped here: read metrics.jsonl again
        self._down_since: float | None = None
        self._refused = False  # the server refused the reports for good: nothing more is sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if self._refused:
            return
        try:
            self._queue.put_nowait((step, dict(metrics)))
        except queue.Full:
            self._backlog = True

    def close(self) -> None:
        """Give the thread close_timeout_s to deliver what is left; never raises."""
        self._stop.set()
        self._thread.join(self.close_timeout_s)
        if not self._refused and (self._thread.is_alive() or self._pending or self._backlog):
            log.warning("MLflow run %s: %d training report(s) could not be sent; they are kept in %s",
                        self.run_id, len(self._pending) + self._queue.qsize(), self.metrics_file)

    def _run(self) -> None:
        backoff = SEND_EVERY_S
        while True:
            stopping = self._stop.wait(backoff)
            self._drain()
            try:
                self._send()
                backoff = SEND_EVERY_S
            except Exception as exc:  # any failure of the server or the network: keep training, retry later
                if refused_for_good(exc):
                    return self._give_up(exc)
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("MLflow is unreachable (%s); training goes on, metrics are kept in %s and sent "
                                "when it is back", exc, self.metrics_file)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                if stopping:
                    return self._last_tries()
                continue
            if stopping:
                return

    def _last_tries(self) -> None:
        """After the run ended with the server away: keep trying (every second) until close() gives up."""
        while True:
            time.sleep(SEND_EVERY_S)
            try:
                self._send()
                return
            except Exception as exc:
                if refused_for_good(exc):
                    return self._give_up(exc)

    def _give_up(self, exc) -> None:
        """After a refusal for good (refused_for_good): drop what is pending and say so, once."""
        self._refused = True
        self._pending.clear()
        log.warning("MLflow refused the training reports of run %s (HTTP %d, %s); retrying cannot change that, so "
                    "no more are sent. Training goes on and every report is kept in %s", self.run_id,
                    exc.get_http_status_code(), exc, self.metrics_file)

    def _drain(self) -> None:
        while True:
            try:
                step, metrics = self._queue.get_nowait()
            except queue.Empty:
                return
            if len(self._pending) < MAX_PENDING:
                self._pending[step] = metrics
            else:
                self._backlog = True

    def _send(self) -> None:
        from mlflow.entities import Metric

        if self._logged is None:
            self._logged = {m.step for m in self._client.get_metric_history(self.run_id, "loss")}
        if self._backlog:
            self._backlog = False
            self._pending.update(self._read_file())
        for step in [s for s in self._pending if s in self._logged]:
            del self._pending[step]
        steps = sorted(self._pending)
        now_ms = int(time.time() * 1000)
        per_request = MAX_BATCH // max([len(m) for m in self._pending.values()] + [1])
        for start in range(0, len(steps), per_request):
            chunk = steps[start:start + per_request]
            self._client.log_batch(self.run_id, metrics=[Metric(key, float(value), now_ms, step) for step in chunk
                                                         for key, value in self._pending[step].items()])
            self._logged.update(chunk)
            for step in chunk:
                del self._pending[step]
        if self._down_since is not None:
            log.warning("MLflow is back after %.0f s; the reports since were sent",
                        time.monotonic() - self._down_since)
            self._down_since = None

    def _read_file(self) -> dict[int, dict[str, float]]:
        rows = {}
        for line in self.metrics_file.read_text().splitlines() if self.metrics_file.is_file() else []:
            with contextlib.suppress(ValueError):  # a line being written right now
                row = json.loads(line)
                rows[row.pop("step")] = row
        return rows


def refused_for_good(exc: Exception) -> bool:
    """True for an MLflow error that retrying cannot change: an HTTP 4xx answer (or a request the client
    refuses to send), except those in RETRIED_CLIENT_ERRORS. Errors of the network or a 5xx are False."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status not in RETRIED_CLIENT_ERRORS
def start_system_metrics(run_id: str):
    """MLflow's system-metrics monitor logging to `run_id`, started; None (after a warning) if it cannot start."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_EVERY_S)
    except Exception as exc:  # e.g. psutil missing: training goes on without system metrics
        log.warning("MLflow run %s gets no system metrics: %s", run_id, exc)
        return None
    monitor.start()
    return monitor


@contextlib.contextmanager
def mlflow_metrics_from_environ(run_dir: Path) -> Iterator[MetricsCallback | None]:
    """On rank 0 with MLFLOW_RUN_ID set: the asynchronous MLflow callback for the run in `run_dir`, and the
    system-metrics monitor, both closed on exit (also after an error, which they never hide). Otherwise None."""
    run_id = os.environ.get(RUN_ID_ENV)
    if not run_id or int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    callback = AsyncMlflowMetrics(run_id, Path(run_dir) / "metrics.jsonl")
    monitor = start_system_metrics(run_id)
    try:
        yield callback
    finally:
        callback.close()
        if monitor is not None:
            monitor.finish()
