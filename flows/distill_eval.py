"""distill-eval: a registered version (the teacher, by default a model's champion) → a few-step student,
registered with its teacher as parent, sampled with its own sampler and scored under its own gate.

    python -m flows.distill_eval --model ddpm-mnist-cond --set distill.method=progressive --set distill.steps=3000

Everything is resolved and checked before any work: the teacher version (an alias or a number), the
student's config (the teacher's model config with this worker's data settings, then the `distill.*`
overrides; diffusion_core.distill.student_config makes it sample with distill.method's sampler at
distill.sample_steps evaluations) and the gate of the student's registered model,
`<teacher model>-<method><sample_steps>` (e.g. `ddpm-mnist-cond-progressive4`; flows.gate: made from the
first student's config, so every later student is scored like it). Steps: prepare-dataset → distill (one
process; the loss curve and metrics.jsonl as run artifacts) → register (a version of the student model,
tagged `distill.teacher` = `<teacher model>/<version>`, `distill.teacher_run`, the method and its steps, and
described in words; alias `challenger`) → sample and evaluate the primary setting (the student's sampler on
the gate's evaluation budget) → champion selection among that model's students by its gate's rule.
Serving works as for any version: `mlflow.pyfunc.load_model("models:/ddpm-mnist-cond-progressive4@champion")`
samples with the student's sampler and steps unless asked otherwise.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from diffusion_core.checkpoint import load_model
from diffusion_core.config import parse_override
from diffusion_core.distill import distill, student_config
from diffusion_core.distributed import DistContext, resolve_device

from .evaluate import evaluate_samples, gap_spread
from .gate import ensure_gate
from .parameters import check_distill_overrides
from .prepare import prepare_dataset_flow
from .register import MODEL_ARTIFACT, VERSION_TAGS, register_model_folder
from .registry import CHALLENGER, CHAMPION, resolve_version, select_champion, version_parser
from .report import publish_report
from .rescore import worker_config
from .sample import sample_images
from .tracking import ended_when_done, log_metrics, set_tags, upload_artifacts
from .train_eval import RUNS_DIR_ENV, create_run, log_setup, primary_score

DISTILL_ARTIFACTS = ("loss_curve.png", "metrics.jsonl")


def student_model_name(teacher_model: str, method: str, sample_steps: int) -> str:
    """The registered model of `teacher_model`'s students by `method` at `sample_steps` evaluations: one
    per kind, so each kind has its own gate and champion."""
    return f"{teacher_model}-{method}{sample_steps}"


def guided_by(config) -> str:
    """", its ODE guided at w = …," for a student of the guided teacher (distill.guidance > 0), else ""."""
    return f", its ODE guided at w = {config.distill.guidance:g}," if config.distill.guidance else ""


@flow(name="distill-eval")
def distill_eval(model: str, version: str | None = None, alias: str = CHAMPION,
                 overrides: dict[str, Any] | None = None, extractor: str | None = None) -> str:
    """Distil `model` version `version` (default: the one `alias` points at) with `overrides` (distill.*,
    sample.* and evaluation.* settings of the student, {"distill.steps": 3000, …}, bounded by flows.parameters)
    into a few-step student; register, sample and score it under the student model's gate. Returns the MLflow
    run id."""
    overrides = check_distill_overrides(overrides or {})  # flows.parameters: refused before any work
    client = MlflowClient()
    version = resolve_version(client, model, version, alias)
    teacher_uri = f"models:/{model}/{version}"
    work_dir = Path(os.environ.get(RUNS_DIR_ENV) or "runs") / flow_run.id
    (work_dir / "teacher").mkdir(parents=True, exist_ok=True)  # downloaded once: read here, distilled below
    teacher_dir = mlflow.artifacts.download_artifacts(artifact_uri=teacher_uri, dst_path=str(work_dir / "teacher"))
    config = student_config(worker_config(load_model(teacher_dir).config), overrides)
    name = student_model_name(model, config.distill.method, config.distill.sample_steps)
    gate = ensure_gate(client, name, config, extractor or "lenet", f"distill-eval run {flow_run.name}")
    gate.check_overrides(name, overrides, extractor, config.data.dataset)
    config = gate.apply(config)
    submitted = config.to_dict()
    run_id = create_run(client, config, work_dir, f"distill-{model}-v{version}")
    teacher_run = client.get_model_version(model, version).run_id
    set_tags(client, run_id, {"distill.teacher": f"{model}/{version}", "distill.teacher_run": teacher_run})
    logger = get_run_logger()
    logger.info("MLflow run %s: distilling %s into %s by %s (%d steps, %d evaluations per image)", run_id,
                teacher_uri, name, config.distill.method, config.distill.steps, config.distill.sample_steps)
    with ended_when_done(client, run_id):
        log_setup(client, run_id, config, work_dir, 1, gate.extractor, gate)
        prepare_dataset_flow(run_id, submitted)
        started = time.perf_counter()
        resolved = {k: v for k, v in config.flat().items() if "." in k}  # the submitted config, as overrides
        result = distill(teacher_dir, work_dir, resolved, device=resolve_device(config.train.device, DistContext()))
        seconds = time.perf_counter() - started
        for artifact in DISTILL_ARTIFACTS:
            upload_artifacts(client, run_id, work_dir / artifact)
        log_metrics(client, run_id, {"distill_seconds": seconds, "distill_loss": result.final_loss,
                                     "distill_images_per_s": result.images_per_s})
        params = client.get_run(run_id).data.params
        tags = {"preset": config.name, **{k: params[k] for k in VERSION_TAGS if k in params},
                "distill.teacher": f"{model}/{version}", "distill.teacher_run": teacher_run,
                "distill.method": config.distill.method, "distill.steps": str(config.distill.steps),
                "distill.sample_steps": str(config.distill.sample_steps), "distill.guidance": str(config.distill.guidance),
                "distill.ode_steps": str(config.distill.ode_steps),
                "distill.teacher_order": str(config.distill.teacher_order),
                "distill.loss_metric": config.distill.loss_metric,
                "distill.level_focus": str(config.distill.level_focus),
                "distill.teacher_precision": result.teacher_precision,  # as resolved on the machine that distilled
                "distill.seconds": f"{seconds:.1f}"}
        student = register_model_folder(client, run_id, work_dir / MODEL_ARTIFACT, name, tags)
        client.update_model_version(name, student, description=(
            f"Distilled from {model} v{version}{guided_by(config)} by {config.distill.method} distillation: "
            f"{config.distill.steps} steps ({seconds:.0f} s), sampled with {config.distill.sample_steps} network "
            "evaluations per image."))
        client.set_registered_model_alias(name, CHALLENGER, student)
        set_tags(client, run_id, {"model_version": student})
        sample_images(run_id, f"models:/{name}/{student}", submitted, only_primary=True)
        evaluate_samples(run_id, submitted, gate.extractor)
        score = primary_score(client, run_id, config)
        decision = select_champion(client, name, student, score, gate.rule, gap_spread(client, config, gate.extractor))
        set_tags(client, run_id, decision.tags())
        logger.info("%s version %s: %s (%s)", name, student, decision.tags()["champion.decision"], decision.reason)
        publish_report(client, run_id, config, gate.extractor, name, student, decision,
                       f"{model} v{version}{guided_by(config)}, distilled by {config.distill.method} in "
                       f"{config.distill.steps} steps")
    return run_id


def main(argv: list[str] | None = None) -> None:
    parser = version_parser("python -m flows.distill_eval", __doc__, "distil")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="a setting of the student (repeatable), e.g. --set distill.steps=3000")
    parser.add_argument("--extractor", help="FID features for a new student model's gate (default lenet)")
    args = parser.parse_args(argv)
    run_id = distill_eval(model=args.model, version=args.version, alias=args.alias,
                          overrides=dict(parse_override(o) for o in args.overrides), extractor=args.extractor)
    print(f"MLflow run {run_id}")


if __name__ == "__main__":
    main()
