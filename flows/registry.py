"""The model registry: loading a registered model, and moving the `champion` alias.

Every train-eval run registers its EMA model (safetensors + config.json, never a pickle) as a new
version of `ddpm-<dataset>` with the alias `challenger`. After evaluation the version is tagged with
its FID (`eval.fid`) and with everything that FID depends on (`eval.extractor_id`,
`eval.num_samples`, `eval.sampler`, `eval.dataset_sha256`). `champion` moves to the new version only
if the current champion was scored the same way and has a higher FID; the decision, its reason and
both numbers are tagged on the version. Switching the evaluation protocol therefore needs a
deliberate, manual `set_registered_model_alias`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import mlflow
import torch
from mlflow import MlflowClient

from diffusion_core.checkpoint import LoadedModel, load_model

CHAMPION, CHALLENGER = "champion", "challenger"
FID_TAG = "eval.fid"
PROTOCOL_KEYS = ("extractor_id", "num_samples", "sampler", "dataset_sha256")


def load_registered_model(uri: str, device: torch.device | str = "cpu") -> LoadedModel:
    """A model from the registry (`models:/ddpm-mnist@champion`, `models:/ddpm-mnist/3`) or any MLflow
    artifact URI of an exported model folder (`runs:/<id>/model`), loaded and ready to sample."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_model(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp), device)


@dataclass(frozen=True)
class Score:
    """A version's FID and the protocol it was measured with (comparable only when these are equal)."""

    fid: float
    protocol: dict[str, str]

    def tags(self) -> dict[str, str]:
        return {FID_TAG: repr(self.fid), **{f"eval.{key}": self.protocol[key] for key in PROTOCOL_KEYS}}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Score | None:
        if FID_TAG not in tags:
            return None
        return cls(float(tags[FID_TAG]), {key: tags.get(f"eval.{key}", "") for key in PROTOCOL_KEYS})


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    candidate_fid: float
    champion_version: str | None
    champion_fid: float | None

    def tags(self) -> dict[str, str]:
        return {"champion.decision": "promoted" if self.promoted else "kept", "champion.reason": self.reason,
                "champion.candidate_fid": repr(self.candidate_fid),
                "champion.previous_version": self.champion_version or "none",
                "champion.previous_fid": "none" if self.champion_fid is None else repr(self.champion_fid)}


def _judge(score: Score, champion_version: str | None, champion: Score | None) -> Decision:
    if champion_version is None:
        return Decision(True, "no champion yet", score.fid, None, None)
    if champion is None or champion.protocol != score.protocol:
        differs = sorted(k for k in PROTOCOL_KEYS if champion is None or champion.protocol[k] != score.protocol[k])
        return Decision(False, f"champion v{champion_version} was scored differently ({', '.join(differs)}): "
                        "not comparable, kept", score.fid, champion_version, champion.fid if champion else None)
    better = score.fid < champion.fid  # a NaN FID is never better
    relation = "<" if better else "is not below"
    return Decision(better, f"FID {score.fid:.6g} {relation} champion v{champion_version}'s {champion.fid:.6g}",
                    score.fid, champion_version, champion.fid)


def select_champion(client: MlflowClient, name: str, version: str, score: Score) -> Decision:
    """Tag `version` with its score, move `champion` to it if it beats the current champion, and tag the
    decision. (Two runs deciding at the same moment can both read the old champion: run them in turn.)"""
    for key, value in score.tags().items():
        client.set_model_version_tag(name, version, key, value)
    champion_version, champion = client.get_registered_model(name).aliases.get(CHAMPION), None
    if champion_version is not None:
        champion_version = str(champion_version)
        champion = Score.from_tags(client.get_model_version(name, champion_version).tags)
    decision = _judge(score, champion_version, champion)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    for key, value in decision.tags().items():
        client.set_model_version_tag(name, version, key, value)
    return decision
