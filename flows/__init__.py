"""Prefect flows of the train-eval pipeline: thin orchestration over diffusion_core, tracked in MLflow.

Every step reads what it needs from the MLflow run (its resolved config, its artifacts) and writes
what it makes back to it, so the steps share an MLflow run id and a working folder, nothing else.
"""
