"""train-eval: one reproducible, tracked run from a preset to an evaluated, registered model.

    python -m flows.train_eval --preset smoke --set train.steps=40

Parameters are checked (flows.parameters), the config resolved and fitted to the registered model's
gate (flows.gate: the protocol every candidate of that model is scored with and the promotion rule),
all before any work. That resolved config is submitted once: every step receives it as a flow
parameter, and the MLflow copy (`config.json`, its sha256 as the param `config_sha256`) is a record,
never read back. Steps (each a flow of its own, sharing the config, the MLflow run id and the working
folder `$DIFFUSION_RUNS_DIR/<flow run id>`, default `runs/`): prepare-dataset → the policy's plan
(flows.nightly: train fresh, continue the training state of the champion's line, or skip a night with
nothing new) →
train (torchrun) →
register-checkpoint (new version of `ddpm-<dataset>`, or `ddpm-<dataset>-cond` for a class-conditional
model, alias `challenger`) → sample (DDPM and DDIM, plus the guidance and NFE sweeps)
→ evaluate (FID …) → champion selection on the primary sampler's FID and its standard error, by the
gate's rule (see flows.registry). A champion scored on another dataset version than this run's (new data
at the source) is re-scored on this one first (flows.rescore), so the two are compared on the same data.

The MLflow run (experiment `diffusion-<dataset>`, name `<preset>-<UTC time>-<flow run name>`)
holds the resolved config as params and as `config.json`, the git commit, torch version, device and
world size, the dataset sha256 and input, training and evaluation metrics, the plots, the
checkpoint, the model and the samples. Without PREFECT_API_URL and MLFLOW_TRACKING_URI everything
runs embedded: Prefect's ephemeral API and `mlflow.db` in the working folder.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.entities import SourceType
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER
from prefect import flow, get_run_logger
from prefect.runtime import deployment, flow_run
from prefect.states import Completed

from diffusion_core.config import DEFAULT_PRESET, Config, load_config, parse_override
from diffusion_core.distributed import DistContext, resolve_device
from diffusion_core.launch import resolve_nproc, write_resolved_config

from diffusion_core.evaluation.extractors import canonical_name

from .evaluate import evaluate_samples, gap_spread
from .gate import Gate, ensure_gate
from .nightly import POLICIES, check_policy, lineage_tags, plan_run
from .parameters import check_run_parameters
from .prepare import prepare_dataset_flow
from .register import register_checkpoint
from .registry import Score, current_champion, select_champion
from .report import publish_report, publish_skip
from .sample import primary_setting, sample_images
from .tracking import (ended_when_done, ensure_experiment, git_commit, log_params, registered_model_name, set_tags,
                       upload_artifacts)
from .train import train_model

RUNS_DIR_ENV = "DIFFUSION_RUNS_DIR"


def create_run(client: MlflowClient, config: Config, work_dir: Path, run_name: str) -> str:
    """A new run in the dataset's experiment named `<run_name>-<UTC time>-<flow run name>`, tagged with its
    Prefect flow run, its working folder and its source (what MLflow's UI shows as Source and Version);
    return its id."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run = client.create_run(
        ensure_experiment(client, config.data.dataset), run_name=f"{run_name}-{stamp}-{flow_run.name}",
        tags={"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name,
              "prefect.deployment": deployment.name or "none", "work_dir": str(work_dir.resolve()),
              MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
              MLFLOW_SOURCE_NAME: f"flows/{flow_run.flow_name.replace('-', '_')}.py",
              MLFLOW_GIT_COMMIT: git_commit(), MLFLOW_USER: getpass.getuser()})
    return run.info.run_id


def config_sha256(config: Config) -> str:
    """The sha256 of the resolved config's canonical JSON: what the run was submitted with."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()


def log_setup(client: MlflowClient, run_id: str, config: Config, work_dir: Path, nproc_per_node: int | str,
              extractor: str, gate: Gate) -> None:
    """Params (the resolved config and what else decides the result), and the resolved config file (a record)."""
    log_params(client, run_id, {
        **config.flat(), "git_commit": git_commit(), "torch_version": torch.__version__,
        "device": resolve_device(config.train.device, DistContext()).type, "config_sha256": config_sha256(config),
        "nproc_per_node": nproc_per_node, "world_size": resolve_nproc(nproc_per_node), "eval.extractor": extractor,
        "gate.revision": gate.revision, "gate.rule": str(gate.rule)})
    upload_artifacts(client, run_id, write_resolved_config(config, work_dir))


def primary_score(client: MlflowClient, run_id: str, config: Config) -> Score:
    """The run's headline FID and its standard error (the primary sampler on the evaluation budget, at the
    config's guidance for a conditional model), their protocol, and the run (which holds the samples)."""
    run = client.get_run(run_id)
    params, metrics = run.data.params, run.data.metrics
    return Score(metrics["fid"], {"extractor_id": params["eval.extractor_id"], "num_samples": params["eval.num_samples"],
                                  "sampler": primary_setting(config).protocol,
                                  "dataset_sha256": params["eval.dataset_sha256"]}, metrics.get("fid_std", 0.0), run_id)


def submitted_config(preset: str, overrides: dict[str, Any], nproc_per_node: int | str, num_samples: int | None,
                     ddim_steps: int | None, ddim_eta: float | None, extractor: str | None,
                     client: MlflowClient, by: str, policy: str = "fresh") -> tuple[Config, str, Gate]:
    """Check the parameters, resolve the config and fit it to its registered model's gate (created from
    this config when the model has none); a ConfigError names what is refused. Returns the config every
    step receives, the canonical extractor name and the gate."""
    check_policy(policy)
    preset, flat = check_run_parameters(preset, overrides, nproc_per_node, num_samples)
    sampling = {"sample.num_samples": num_samples, "sample.steps": ddim_steps, "sample.eta": ddim_eta}
    flat = {**flat, **{k: v for k, v in sampling.items() if v is not None}}
    config = load_config(preset, flat)
    if extractor is not None:
        canonical_name(extractor, config.data.dataset)  # refuse an unknown name before any work
    name = registered_model_name(config.data.dataset, config.conditional)
    gate = ensure_gate(client, name, config, extractor or "lenet", by)
    gate.check_overrides(name, flat, extractor, config.data.dataset)
    return gate.apply(config), gate.extractor, gate


@flow(name="train-eval")
def train_eval(preset: str = DEFAULT_PRESET, overrides: dict[str, Any] | None = None, nproc_per_node: int | str = 1,
               num_samples: int | None = None, ddim_steps: int | None = None, ddim_eta: float | None = None,
               extractor: str | None = None, policy: str = "fresh") -> str:
    """Train `preset` + `overrides` ({"train.steps": 500, …}) on `nproc_per_node` ranks, register, sample
    and evaluate it: the primary setting (the config's sample.sampler with `ddim_steps` steps and
    η=`ddim_eta`, names kept from when the primary sampler was always DDIM; unset: the config's sample.*)
    on evaluation.num_samples images, every other setting (DDPM, sweeps) and the grids on `num_samples`
    (unset: sample.num_samples). The primary setting, the evaluation budget and the extractor (unset:
    the gate's) are the registered model's gate's (flows.gate); parameters that contradict it are refused.
    It becomes the champion if its primary FID beats the current champion's by more than the gate's
    margin, or, continuing the champion's line under a "not-worse" gate, unless it is worse than its line's
    best beyond that margin (flows.registry). `policy` (flows.nightly): "fresh" trains from scratch, "continue" continues
    the training head (the newest version of the champion's line the gate did not find worse), "skip-unchanged" ends without training when data, code and config
    equal the champion's (final state "Skipped").
    Parameters are checked against what a run may ask for (flows.parameters) before any work.
    Returns the MLflow run id."""
    client = MlflowClient()
    config, extractor, gate = submitted_config(preset, overrides or {}, nproc_per_node, num_samples, ddim_steps,
                                               ddim_eta, extractor, client, f"train-eval run {flow_run.name}",
                                               policy)
    submitted = config.to_dict()
    work_dir = Path(os.environ.get(RUNS_DIR_ENV) or "runs") / flow_run.id
    run_id = create_run(client, config, work_dir, config.name)
    logger = get_run_logger()
    logger.info("MLflow run %s, working folder %s, gate revision %d (%s)", run_id, work_dir, gate.revision, gate.rule)
    with ended_when_done(client, run_id):
        log_setup(client, run_id, config, work_dir, nproc_per_node, extractor, gate)
        dataset_sha256 = prepare_dataset_flow(run_id, submitted)
        name = registered_model_name(config.data.dataset, config.conditional)
        plan = plan_run(client, name, policy, config, dataset_sha256, git_commit(), config_sha256(config), work_dir,
                        gate.rule)
        set_tags(client, run_id, plan.tags())
        logger.info("policy %s: %s", policy, plan.reason)
        if plan.mode == "skip":
            set_tags(client, run_id, {"mlflow.note.content": f"Skipped: {plan.reason}"})
            publish_skip(client, run_id, name, plan.reason)
            return Completed(name="Skipped", message=plan.reason, data=run_id)
        seconds = train_model(run_id, str(work_dir), submitted, nproc_per_node, plan.state_file, plan.new_data)
        model_info = json.loads((work_dir / "model" / "config.json").read_text())
        version = register_checkpoint(run_id, str(work_dir), submitted, lineage_tags(plan, run_id, model_info, seconds))
        sample_images(run_id, f"models:/{name}/{version}", submitted)
        evaluate_samples(run_id, submitted, extractor)
        score = primary_score(client, run_id, config)
        rescore_champion_on_new_data(client, name, score)
        decision = select_champion(client, name, version, score, gate.rule, gap_spread(client, config, extractor))
        set_tags(client, run_id, {"model_version": version, **decision.tags()})
        logger.info("%s version %s: %s (%s)", name, version, decision.tags()["champion.decision"], decision.reason)
        publish_report(client, run_id, config, extractor, name, version, decision, plan.reason)
    return run_id


def rescore_champion_on_new_data(client: MlflowClient, name: str, score: Score) -> None:
    """Re-score `name`'s champion (flows.rescore) when it was scored on another dataset version than `score`."""
    from .rescore import rescore  # rescore builds on this module's run helpers

    version, champion = current_champion(client, name)
    if champion is not None and champion.protocol["dataset_sha256"] != score.protocol["dataset_sha256"]:
        get_run_logger().info("champion v%s was scored on dataset %s, this run on %s: re-scoring it first", version,
                              champion.protocol["dataset_sha256"][:12], score.protocol["dataset_sha256"][:12])
        rescore(model=name, version=version)


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.train_eval`: the whole pipeline from one command, with or without servers."""
    parser = argparse.ArgumentParser(prog="python -m flows.train_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="preset name (diffusion_core/presets/) or a .toml path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one setting (repeatable), e.g. --set train.steps=100")
    parser.add_argument("--nproc-per-node", default="1", help="training processes (an integer or 'auto')")
    parser.add_argument("--num-samples", type=int, help="images per sampler besides the primary one, whose score uses evaluation.num_samples "
                             "(default: sample.num_samples)")
    parser.add_argument("--ddim-steps", type=int, help="DDIM steps (default: sample.steps)")
    parser.add_argument("--ddim-eta", type=float, help="DDIM η (default: sample.eta)")
    parser.add_argument("--extractor", help="FID features: lenet (offline) or inception (default: the registered "
                        "model's gate; lenet for a new model)")
    parser.add_argument("--policy", default="fresh", choices=POLICIES,
                        help="fresh: from scratch; continue: the training state of the champion's line; skip-unchanged: no "
                             "training when data, code and config equal the champion's (flows.nightly)")
    args = parser.parse_args(argv)
    run_id = train_eval(preset=args.preset, overrides=dict(parse_override(o) for o in args.overrides),
                        nproc_per_node=args.nproc_per_node, num_samples=args.num_samples, ddim_steps=args.ddim_steps,
                        ddim_eta=args.ddim_eta, extractor=args.extractor, policy=args.policy)
    print(f"MLflow run {run_id}")


if __name__ == "__main__":
    main()
