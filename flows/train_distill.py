"""train-distill: one run from data to a few-step student. A train-eval run of the preset (trained,
registered, sampled, scored and gated like any other run), then distill-eval of the version it
registered, with the preset's own `distill.*` settings and `distill_overrides` on top:

    python -m flows.train_distill --preset mnist-cpu-cond-few-step
    prefect deployment run 'train-distill/few-step' --param preset=mnist-cpu-cond-few-step --watch

prepare → train → register → sample → evaluate → gate (the teacher, flows.train_eval) → distil →
register → sample → evaluate → gate (the student, flows.distill_eval: a version of
`<teacher model>-<method><sample_steps>` whose tags name its teacher). The student's settings are checked
before any work; a run whose train-eval part trains nothing (policy skip-unchanged) distils nothing.
"""

from __future__ import annotations

import argparse
from typing import Any

from mlflow import MlflowClient
from prefect import flow, get_run_logger

from diffusion_core.config import DEFAULT_PRESET, load_config, parse_override
from diffusion_core.distill import student_config

from .distill_eval import distill_eval
from .parameters import check_distill_overrides, check_run_parameters
from .tracking import registered_model_name
from .train_eval import train_eval


@flow(name="train-distill")
def train_distill(preset: str = DEFAULT_PRESET, overrides: dict[str, Any] | None = None,
                  distill_overrides: dict[str, Any] | None = None, nproc_per_node: int | str = 1,
                  num_samples: int | None = None, policy: str = "fresh") -> dict[str, str | None]:
    """Train `preset` + `overrides` through train-eval, then distil the version it registered with the
    preset's distill.* settings and `distill_overrides` ({"distill.steps": 3000, …}) through distill-eval.
    Returns the MLflow run ids: {"teacher": …, "student": … or None when nothing was trained}."""
    checked_preset, flat = check_run_parameters(preset, overrides or {}, nproc_per_node, num_samples)
    config = load_config(checked_preset, flat)
    distill_flat = check_distill_overrides(distill_overrides or {})
    student_config(config, distill_flat)  # a ConfigError names a bad student setting before any work
    teacher_run = train_eval(preset=preset, overrides=overrides, nproc_per_node=nproc_per_node,
                             num_samples=num_samples, policy=policy)
    version = MlflowClient().get_run(teacher_run).data.tags.get("model_version")
    if version is None:
        get_run_logger().info("train-eval run %s registered no version (nothing new to train): nothing to distil",
                              teacher_run)
        return {"teacher": teacher_run, "student": None}
    student_run = distill_eval(model=registered_model_name(config.data.dataset, config.conditional), version=version,
                               overrides=distill_flat)
    return {"teacher": teacher_run, "student": student_run}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.train_distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="preset name (diffusion_core/presets/) or a .toml path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="a setting of the teacher's training (repeatable), e.g. --set train.steps=200")
    parser.add_argument("--distill-set", dest="distill_overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="a setting of the student (repeatable), e.g. "
                        "--distill-set distill.steps=3000")
    parser.add_argument("--nproc-per-node", default="1", help="training processes (an integer or 'auto')")
    args = parser.parse_args(argv)
    runs = train_distill(preset=args.preset, overrides=dict(parse_override(o) for o in args.overrides),
                         distill_overrides=dict(parse_override(o) for o in args.distill_overrides),
                         nproc_per_node=args.nproc_per_node)
    print(f"MLflow runs: teacher {runs['teacher']}, student {runs['student']}")


if __name__ == "__main__":
    main()
