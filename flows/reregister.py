"""reregister: a version registered before versions became MLflow `python_function` models (its `MLmodel`
has no flavor), registered again as one, so that MLflow can load and serve it.

    python -m flows.reregister --model ddpm-mnist --version 3

The version's files are downloaded; its exported model (the same `model.safetensors` and `config.json`
bytes) becomes a pyfunc model (flows.register), logged to a new run `reregister-<model>-v<version>` of
the dataset's experiment (tag `reregistered_from` = `<model>/<version>`) and registered as a new version
of the same model. The new version gets the tag `reregistered_from` (the old version number) and the old
version's tags except its `champion.*` decision record: the score (`eval.*`, its protocol and history)
stays true because the weights are the same bytes, while the decision was about the old version. The
aliases that pointed at the old version (`champion`, `challenger`) move to the new one under the model's
champion lock, so `models:/<model>@champion` serves; `--keep-aliases` leaves them where they are. The old
version stays as it was. A version that already is a pyfunc model is refused, before any work.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.models import Model

from diffusion_core.checkpoint import load_model
from diffusion_core.config import ConfigError

from .register import register_model_folder
from .registry import champion_lock
from .tracking import ended_when_done, ensure_experiment

REREGISTERED_FROM = "reregistered_from"
NOT_COPIED = "champion."  # the old version's decision record
log = logging.getLogger(__name__)


def reregister(client: MlflowClient, model: str, version: str, move_aliases: bool = True) -> tuple[str, list[str]]:
    """Register `model` version `version` again as a pyfunc model; return (the new version, the aliases moved)."""
    old = client.get_model_version(model, version)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model}/{version}", dst_path=tmp))
        if (folder / "MLmodel").is_file() and "python_function" in Model.load(str(folder / "MLmodel")).flavors:
            raise ConfigError(f"{model} version {version} already is a python_function model: "
                              f"load or serve models:/{model}/{version} as it is")
        config = load_model(folder).config
        run_id = client.create_run(ensure_experiment(client, config.data.dataset),
                                   run_name=f"reregister-{model}-v{version}",
                                   tags={REREGISTERED_FROM: f"{model}/{version}"}).info.run_id
        with ended_when_done(client, run_id):
            tags = {key: value for key, value in old.tags.items() if not key.startswith(NOT_COPIED)}
            new = register_model_folder(client, run_id, folder, model, {**tags, REREGISTERED_FROM: str(version)})
    moved = []
    if move_aliases:
        with champion_lock(model):  # no champion decision moves an alias meanwhile
            for alias, target in client.get_registered_model(model).aliases.items():
                if str(target) == str(version):
                    client.set_registered_model_alias(model, alias, new)
                    moved.append(alias)
    log.info("%s version %s registered again as version %s (aliases moved: %s)", model, version, new,
             ", ".join(moved) or "none")
    return new, moved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.reregister", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered model name, e.g. ddpm-mnist")
    parser.add_argument("--version", required=True, help="the version to register again")
    parser.add_argument("--keep-aliases", action="store_true", help="leave the old version's aliases where they are")
    args = parser.parse_args(argv)
    new, moved = reregister(MlflowClient(), args.model, args.version, move_aliases=not args.keep_aliases)
    print(f"{args.model} version {args.version} -> version {new} (aliases moved: {', '.join(moved) or 'none'})")


if __name__ == "__main__":
    main()
