"""What a train-eval run starts from: its policy, decided before any training and recorded.

  fresh            train from scratch (the adhoc default).
  continue         continue the training head's full training state (weights, EMA, optimizer, RNG streams,
                   step: the run's `checkpoints/last.safetensors`, named by the version's `lineage.state`
                   tag) for train.steps more under train.continue_schedule and train.continue_ema_std. The head is the newest version
                   descending from the champion that the gate did not find worse than it and that was not
                   rolled back from (see training_head): under a gate whose continuations must be
                   "better", a night kept only because its gain was inside the noise is not thrown away,
                   else the next night would repeat it bit for bit; under "not-worse" (the default) such
                   a night is the champion, and the head is the champion. A champion whose state is
                   missing or was trained with other settings (model, diffusion, the objective) cannot be
                   continued: the run trains fresh and says why, naming both settings. New data at the
                   source is continued on, and said so.
  skip-unchanged   when the dataset version, the code commit and the resolved config all equal the
                   champion's, end at once without training (Prefect state "Skipped", MLflow tags and
                   note say why); otherwise as `continue`.

Every registered version carries its lineage (lineage_tags): the version it continued (`lineage.parent`),
images seen and training seconds summed along the chain, the runs (nights) it took, and where its training
state is; the same in words (lineage_summary) is the version's description, the first thing its page in the
MLflow UI shows.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow import MlflowClient

from diffusion_core.checkpoint import load_training_checkpoint
from diffusion_core.config import Config, ConfigError
from diffusion_core.train import CHECKPOINT, ContinuationMismatch, check_continuable

from .registry import CHAMPION, PARENT_TAG, PromotionRule, Score, rolled_back_from

POLICIES = ("continue", "fresh", "skip-unchanged")
STATE_TAG = "lineage.state"  # runs:/<run id>/checkpoints/last.safetensors: the version's full training state
MODE_TAG = "lineage.mode"
IMAGES_TAG, SECONDS_TAG, RUNS_TAG = "lineage.images_seen", "lineage.train_seconds", "lineage.runs"


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ConfigError(f"policy={policy!r} is unknown; choose one of {', '.join(POLICIES)}")
    return policy


@dataclass(frozen=True)
class Plan:
    """What this run does: `mode` "fresh", "continue" or "skip", why, and for a continuation the parent
    version, its tags and the local copy of its training state."""

    policy: str
    mode: str
    reason: str
    parent: str | None = None
    parent_tags: dict[str, str] | None = None
    state_file: str | None = None
    new_data: bool = False

    def tags(self) -> dict[str, str]:
        return {"night.policy": self.policy, "night.mode": self.mode, "night.reason": self.reason,
                "night.parent": self.parent or "none"}


def training_head(client: MlflowClient, name: str, champion: str, rule: PromotionRule) -> str:
    """The version a `continue` night starts from: the newest version whose lineage.parent chain reaches
    `champion` through versions each scored under the champion's protocol, not worse than the champion
    beyond the margin (the candidate − champion FID ≤ the margin the gate judged it with against this
    champion, else `rule`'s unpaired margin), not kept by the gate as a continuation found worse than its
    line's best, and not rolled back from (flows.registry.rolled_back_from); else the champion itself."""
    scores, parents, margins, rejected = {}, {}, {}, set()
    for version in client.search_model_versions(f"name='{name}'"):
        number = str(version.version)
        parents[number] = version.tags.get(PARENT_TAG, "none")
        scores[number] = Score.from_tags(version.tags)
        compared = version.tags.get("champion.compared_version", version.tags.get("champion.previous_version"))
        if compared == champion:
            with contextlib.suppress(ValueError):
                margins[number] = float(version.tags.get("champion.margin", "none"))
        found_worse = (version.tags.get("champion.basis") == "continuation"
                       and version.tags.get("champion.decision") == "kept")
        if found_worse or rolled_back_from(version.tags, number):
            rejected.add(number)
    best = scores.get(champion)
    if best is None:
        return champion

    def acceptable(number: str) -> bool:
        score = scores.get(number)
        if score is None or score.protocol != best.protocol or number in rejected:
            return False
        margin = margins[number] if number in margins else rule.margin(score, best)
        return score.fid - best.fid <= margin  # a NaN FID is never acceptable

    for number in sorted(parents, key=int, reverse=True):
        chain, node = [], number
        while node not in ("none", champion) and node in parents and node not in chain:
            chain.append(node)
            node = parents[node]
        if node == champion and chain and all(acceptable(v) for v in chain):
            return number
    return champion


def plan_run(client: MlflowClient, name: str, policy: str, config: Config, dataset_sha256: str, commit: str,
             config_sha256: str, work_dir: Path, rule: PromotionRule) -> Plan:
    """Decide what the run does under `policy` against registered model `name`'s current champion (see the
    module doc); `rule` is the model's promotion rule (its gate's), which decides the training head. The
    registered model exists: its gate (flows.gate.ensure_gate) was read or made before."""
    check_policy(policy)
    if policy == "fresh":
        return Plan(policy, "fresh", "policy fresh: trained from scratch")
    champion = client.get_registered_model(name).aliases.get(CHAMPION)
    if champion is None:
        return Plan(policy, "fresh", f"{name} has no champion yet: trained from scratch")
    champion = str(champion)
    tags = client.get_model_version(name, champion).tags
    now = {"dataset_sha256": dataset_sha256, "git_commit": commit, "config_sha256": config_sha256}
    changed = [f"{key} {tags.get(key, 'unrecorded')[:12]} → {value[:12]}" for key, value in now.items()
               if tags.get(key) != value]
    if policy == "skip-unchanged" and not changed:
        return Plan(policy, "skip", f"nothing new since champion v{champion}: dataset version, code commit and "
                    f"resolved config equal its own (data {dataset_sha256[:12]}, code {commit[:12]}, config "
                    f"{config_sha256[:12]}); no training", champion, tags)
    what = f"{', '.join(changed)}; " if changed else ""
    head = training_head(client, name, champion, rule)
    start = (f"champion v{champion}" if head == champion
             else f"v{head} (the training head descending from champion v{champion})")
    if head != champion:
        tags = client.get_model_version(name, head).tags
    if STATE_TAG not in tags:
        return Plan(policy, "fresh", f"{what}{start} has no training state to continue (registered "
                    "before continuation existed): trained from scratch")
    target = work_dir / "continue-from"
    target.mkdir(parents=True, exist_ok=True)
    state_file = Path(mlflow.artifacts.download_artifacts(artifact_uri=tags[STATE_TAG], dst_path=str(target)))
    state = load_training_checkpoint(state_file)
    try:
        check_continuable(state.config, config)
    except ContinuationMismatch as exc:
        return Plan(policy, "fresh", f"{what}{start} cannot be continued ({exc}): trained from scratch")
    new_data = state.dataset_sha256 != dataset_sha256
    data = (f"on new data (dataset {str(state.dataset_sha256)[:12]} → {dataset_sha256[:12]}) " if new_data else "")
    return Plan(policy, "continue", f"{what}continued {start} {data}from step {state.step} for "
                f"train.steps={config.train.steps} more ({_continuation_recipe(config.train)})",
                head, tags, str(state_file), new_data)


def _continuation_recipe(train_config) -> str:
    """How a continuation trains, in words: its learning-rate schedule and the EMA it samples."""
    std = train_config.ema_std_for(continuing=True)
    ema = f"power-function EMA σ_rel={std:g}" if std > 0 else f"EMA decay {train_config.ema_decay:g}"
    return f"{train_config.continue_schedule} schedule, {ema}"


def lineage_tags(plan: Plan, run_id: str, model_info: dict[str, Any], train_seconds: float) -> dict[str, str]:
    """The lineage of the version this run registers: its parent and the chain's totals up to it."""
    parent = plan.parent_tags if plan.mode == "continue" and plan.parent_tags else {}
    return {PARENT_TAG: plan.parent if plan.mode == "continue" else "none", MODE_TAG: plan.mode,
            IMAGES_TAG: str(model_info["images_seen"]),
            SECONDS_TAG: f"{float(parent.get(SECONDS_TAG, 0.0)) + train_seconds:.1f}",
            RUNS_TAG: str(int(parent.get(RUNS_TAG, 0)) + 1),
            STATE_TAG: f"runs:/{run_id}/{CHECKPOINT.as_posix()}"}


def lineage_summary(tags: Mapping[str, str]) -> str:
    """The lineage tags of a version in one line of markdown (its description in the MLflow UI)."""
    parent = tags[PARENT_TAG]
    start = "trained from scratch" if parent == "none" else f"continued v{parent}"
    runs = int(tags[RUNS_TAG])
    minutes = float(tags[SECONDS_TAG]) / 60
    return (f"**Lineage:** {start}; {int(tags[IMAGES_TAG]):,} images seen in {runs} run{'s' if runs > 1 else ''} "
            f"(nights) and {minutes:.1f} min of training along its line; training state `{tags[STATE_TAG]}`.")
