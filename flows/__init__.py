"""Prefect flows of the train-eval pipeline: thin orchestration over diffusion_core, tracked in MLflow.

Every step reads what it needs from the MLflow run (its resolved config, its artifacts) and writes
what it makes back to it, so the steps share an MLflow run id and a working folder, nothing else.
"""

import os

# Defaults set before Prefect and MLflow read their settings on import: no telemetry calls (the
# machine may be offline), and time for the embedded Prefect server's first start (database
# migrations) on a busy machine. Explicit settings in the environment win.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
