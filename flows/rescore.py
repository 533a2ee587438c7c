"""rescore: score a registered version (by default the current champion) under another evaluation protocol.

    python -m flows.rescore --model ddpm-mnist --set evaluation.num_samples=2000
    python -m flows.rescore --model ddpm-mnist --version 3 --preset mnist-cpu --extractor lenet

Champions are only compared under one protocol (extractor, evaluation.num_samples, primary sampler,
dataset version; see flows.registry). When a preset changes its protocol, re-score the champion
first: that is a deliberate, recorded step instead of a dead end. The version's own training config
is the starting point; `--preset` takes the `sample` and `evaluation` sections of that preset,
`--set` changes single sample.* / evaluation.* settings. A new MLflow run (`rescore-<model>-v<version>-…`,
tag `rescore.of`) samples the version with the primary setting on the evaluation budget and evaluates
it like train-eval does; then, under the model's champion lock, the version's `eval.*` tags are
replaced by the new score (the previous ones kept as JSON in `eval.previous`, the run in
`eval.rescored_by`). Later train-eval runs with the new protocol compare against it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from diffusion_core.config import Config, ConfigError, load_config, parse_override

from .evaluate import evaluate_samples
from .parameters import check_overrides, check_preset
from .prepare import prepare_dataset_flow
from .registry import CHAMPION, Score, champion_lock, record_score
from .sample import sample_images
from .tracking import ended_when_done, run_config, set_tags
from .train_eval import RUNS_DIR_ENV, create_run, log_setup, primary_score

PROTOCOL_SECTIONS = ("sample", "evaluation")  # what a re-score may change


def rescore_config(client: MlflowClient, run_id: str, preset: str | None, overrides: dict[str, Any]) -> Config:
    """The version's training config with `preset`'s sample and evaluation sections and `overrides`
    (sample.* / evaluation.* only); data paths from this machine's environment as usual."""
    refused = sorted(key for key in overrides if key.split(".", 1)[0] not in PROTOCOL_SECTIONS)
    if refused:
        raise ConfigError(f"a re-score changes only the evaluation protocol (sample.*, evaluation.*), not "
                          f"{', '.join(refused)}")
    check_overrides(overrides)
    tree = run_config(client, run_id).to_dict()
    if preset:
        fresh = load_config(check_preset(preset)).to_dict()
        tree.update({section: fresh[section] for section in PROTOCOL_SECTIONS})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(tree))
        return load_config(str(path), overrides)


@flow(name="rescore")
def rescore(model: str, version: str | None = None, alias: str = CHAMPION, preset: str | None = None,
            overrides: dict[str, Any] | None = None, extractor: str = "lenet") -> str:
    """Score `model` version `version` (default: the one `alias` points at) under the protocol of the
    version's config + `preset`'s sample/evaluation sections + `overrides`; tag the version with the new
    score. Returns the MLflow run id of the re-score."""
    client = MlflowClient()
    if version is None:
        aliases = client.get_registered_model(model).aliases
        if alias not in aliases:
            raise ConfigError(f"registered model {model!r} has no alias {alias!r} (it has: "
                              f"{', '.join(sorted(aliases)) or 'none'}); give --version")
        version = str(aliases[alias])
    source_run = client.get_model_version(model, version).run_id
    config = rescore_config(client, source_run, preset, overrides or {})
    work_dir = Path(os.environ.get(RUNS_DIR_ENV) or "runs") / flow_run.id
    run_id = create_run(client, config, work_dir, f"rescore-{model}-v{version}")
    set_tags(client, run_id, {"rescore.of": f"{model}/{version}", "rescore.source_run": source_run})
    logger = get_run_logger()
    with ended_when_done(client, run_id):
        log_setup(client, run_id, config, work_dir, 1, extractor)
        prepare_dataset_flow(run_id)
        sample_images(run_id, f"models:/{model}/{version}", only_primary=True)
        evaluate_samples(run_id, extractor)
        score = primary_score(client, run_id, config)
        with champion_lock(model):
            previous = Score.from_tags(client.get_model_version(model, version).tags)
            record_score(client, model, version, score)
            client.set_model_version_tag(model, version, "eval.previous",
                                         json.dumps(previous.tags()) if previous else "none")
            client.set_model_version_tag(model, version, "eval.rescored_by", run_id)
        logger.info("%s version %s re-scored: FID %.4g ± %.2g (%s); before: %s", model, version, score.fid,
                    score.fid_std, score.protocol, previous.tags() if previous else "none")
    return run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.rescore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered model name, e.g. ddpm-mnist")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", help="version to re-score")
    which.add_argument("--alias", default=CHAMPION, help="alias of the version to re-score (default: champion)")
    parser.add_argument("--preset", help="take the sample and evaluation sections of this preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="change one sample.* or evaluation.* setting (repeatable)")
    parser.add_argument("--extractor", default="lenet", help="FID features: lenet (offline) or inception")
    args = parser.parse_args(argv)
    run_id = rescore(model=args.model, version=args.version, alias=args.alias, preset=args.preset,
                     overrides=dict(parse_override(o) for o in args.overrides), extractor=args.extractor)
    print(f"MLflow run {run_id}")


if __name__ == "__main__":
    main()
