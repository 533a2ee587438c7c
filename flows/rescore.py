"""rescore: score a registered version (by default the current champion) under its registered model's gate.

    python -m flows.rescore --model ddpm-mnist-cond
    python -m flows.rescore --model ddpm-mnist-cond --version 3

Champions are only compared under one protocol (extractor, evaluation budget, primary sampler, dataset
version; see flows.registry), and the protocol is the registered model's gate (flows.gate). After the
gate's protocol changes (`python -m flows.gate set`), or after the dataset at the source changed,
re-score the champion: a deliberate, recorded step. The version's own model config (from its model
folder) is sampled with the gate's protocol; the data comes from this worker's environment
(DIFFUSION_DATA_SOURCE, DIFFUSION_DATA_DIR; else the config defaults), never from a stored run. A
re-score cannot choose its protocol, so it can only bring a version to the gate's, never freeze
promotions under another. A new MLflow run (`rescore-<model>-v<version>-…`, tag `rescore.of`) samples
the version on the gate's evaluation budget and evaluates it like train-eval does; then, under the
model's champion lock, the version's `eval.*` tags are replaced by the new score, each score it had
kept in `eval.history.<n>` (flows.registry.rescore_version).
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow import MlflowClient
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from diffusion_core.config import Config, ConfigError, load_config

from .evaluate import evaluate_samples
from .gate import Gate, read_gate
from .prepare import prepare_dataset_flow
from .registry import CHAMPION, load_registered_model, rescore_version, resolve_version, version_parser
from .sample import sample_images
from .tracking import ended_when_done, set_tags
from .train_eval import RUNS_DIR_ENV, create_run, log_setup, primary_score

WORKER_KEYS = ("data.source", "data.data_dir")  # from this worker's environment, never from the store


def worker_config(model_config: Config) -> Config:
    """A registered version's model config with this worker's data settings (WORKER_KEYS)."""
    return load_config(None, {key: value for key, value in model_config.flat().items() if key not in WORKER_KEYS})


def rescore_config(model_config: Config, gate: Gate) -> Config:
    """The version's model config under `gate`'s protocol, with this worker's data settings."""
    return gate.apply(worker_config(model_config))


@flow(name="rescore")
def rescore(model: str, version: str | None = None, alias: str = CHAMPION) -> str:
    """Score `model` version `version` (default: the one `alias` points at) under the model's gate; tag the
    version with the new score. Returns the MLflow run id of the re-score."""
    client = MlflowClient()
    version = resolve_version(client, model, version, alias)
    gate = read_gate(client, model)
    if gate is None:
        raise ConfigError(f"registered model {model!r} has no gate yet (its first train-eval run creates one)")
    uri = f"models:/{model}/{version}"
    config = rescore_config(load_registered_model(uri).config, gate)
    submitted = config.to_dict()
    work_dir = Path(os.environ.get(RUNS_DIR_ENV) or "runs") / flow_run.id
    run_id = create_run(client, config, work_dir, f"rescore-{model}-v{version}")
    source_run = client.get_model_version(model, version).run_id
    set_tags(client, run_id, {"rescore.of": f"{model}/{version}", "rescore.source_run": source_run})
    logger = get_run_logger()
    with ended_when_done(client, run_id):
        log_setup(client, run_id, config, work_dir, 1, gate.extractor, gate)
        prepare_dataset_flow(run_id, submitted)
        sample_images(run_id, uri, submitted, only_primary=True)
        evaluate_samples(run_id, submitted, gate.extractor)
        score = primary_score(client, run_id, config)
        previous = rescore_version(client, model, version, score, run_id)
        logger.info("%s version %s re-scored under gate revision %d: FID %.4g ± %.2g (%s); before: %s", model,
                    version, gate.revision, score.fid, score.fid_std, score.protocol,
                    previous.tags() if previous else "none")
    return run_id


def main(argv: list[str] | None = None) -> None:
    parser = version_parser("python -m flows.rescore", __doc__, "re-score")
    args = parser.parse_args(argv)
    print(f"MLflow run {rescore(model=args.model, version=args.version, alias=args.alias)}")


if __name__ == "__main__":
    main()
