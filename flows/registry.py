"""The model registry: loading a registered model, and moving the `champion` alias.

Every train-eval run registers its EMA model (safetensors + config.json, never a pickle) as a new
version of `ddpm-<dataset>` with the alias `challenger`. After evaluation the version is tagged with
its FID and that FID's standard error (`eval.fid`, `eval.fid_std`) and with everything the FID
depends on (`eval.extractor_id`, `eval.num_samples`, `eval.sampler`, `eval.dataset_sha256`: the
protocol). `champion` moves to the new version only if the current champion was scored with the same
protocol and the new FID is lower by more than the rule's margin, max(k·σ_gap, minimum improvement):
a gap inside the measurement's own noise keeps the champion (a continuation of the champion's own
line under a "not-worse" rule: below). σ_gap is the standard error of the gap
itself, from a paired bootstrap of the two scored sample sets (each score names the run that holds its
samples, `eval.run_id`; diffusion_core.evaluation.fid_gap_std). The gate fixes the sampling seed, so
both sets start from the same noise and the noise they share cancels in the gap: σ_gap is smaller than
√(σ_new² + σ_champion²), the unpaired error the rule falls back to when either set cannot be read. The rule and the
protocol belong to the registered model (its gate, flows.gate), never to the run being judged. The
decision, its rule, both scores and their standard errors are tagged on the version.

The read-compare-move runs under a Prefect global concurrency limit of one slot per registered model
(`champion-<name>`, created when missing), so two runs deciding at once take turns and the second
compares against the first one's result. The decision is tagged on the version before the alias
moves, and a lost lease does not interrupt the block: the alias move is the last write. What holds
for several candidates judged as improvements: the champion's FID only ever falls, each time by more than a margin, and the
final champion is within a margin of the best candidate's FID, but which of two candidates closer than
a margin to each other ends as champion depends on the order they decide in (the first one that clears
the margin over the champion is promoted, and the other is then within the margin of it).

A version that continues the champion's own line (its `lineage.parent` chain reaches the champion: a
nightly `continue` run) is judged by the rule's `continuation` setting. "better" judges it like any
candidate. "not-worse" (the default of new gates) promotes it unless its FID is worse beyond the margin
than the best version of its line scored under the same protocol (the champion, or an ancestor that
scored lower): more training of the same line is expected to help, and a gain a night is too small to
resolve at the gate's N (docs/operations.md) must not hold the champion back, while the line's best
score bounds the drift: the champion's FID then never exceeds its line's best by more than one margin.

A protocol change is never compared across: re-score the champion under the gate's new protocol first
(`python -m flows.rescore`), a recorded step of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
from datetime import datetime, timezone
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from diffusion_core.checkpoint import LoadedModel, load_model
from diffusion_core.config import ConfigError

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
FID_TAG, FID_STD_TAG = "eval.fid", "eval.fid_std"
SCORE_RUN_TAG = "eval.run_id"  # the MLflow run whose samples/<primary tag>.safetensors the score was computed from
SCORE_HISTORY_TAG = "eval.history."  # every score a version had before a re-score replaced it
PARENT_TAG = "lineage.parent"  # the version a version continued ("none": trained from scratch); flows.nightly
ROLLBACK_TAG = "rollback."  # rollback.<n>: JSON records of flows.rollback ({"from", "to", "by", "reason", "at"})
PROTOCOL_KEYS = ("extractor_id", "num_samples", "sampler", "dataset_sha256")
LOCK_TIMEOUT_S = 900  # how long a decision waits for another run's decision on the same model
LOCK_LEASE_S = 300  # the slot's server-side lease, renewed in the background while the lock is held


def load_registered_model(uri: str, device: torch.device | str = "cpu") -> LoadedModel:
    """A model from the registry (`models:/ddpm-mnist@champion`, `models:/ddpm-mnist/3`) or any MLflow
    artifact URI of an exported model folder (`runs:/<id>/model`), loaded and ready to sample."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_model(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp), device)


@dataclass(frozen=True)
class Score:
    """A version's FID, its standard error (0 when not measured), the protocol it was measured with (two
    scores are comparable only when their protocols are equal) and the MLflow run holding the scored
    samples (None when not recorded)."""

    fid: float
    protocol: dict[str, str]
    fid_std: float = 0.0
    run_id: str | None = None

    def tags(self) -> dict[str, str]:
        return {FID_TAG: repr(self.fid), FID_STD_TAG: repr(self.fid_std),
                **{f"eval.{key}": self.protocol[key] for key in PROTOCOL_KEYS},
                **({SCORE_RUN_TAG: self.run_id} if self.run_id else {})}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Score | None:
        if FID_TAG not in tags:
            return None
        return cls(float(tags[FID_TAG]), {key: tags.get(f"eval.{key}", "") for key in PROTOCOL_KEYS},
                   float(tags.get(FID_STD_TAG, 0.0)), tags.get(SCORE_RUN_TAG) or None)


GapSpread = Callable[[Score, Score], float | None]  # (reference, candidate) → σ_gap, None when not measurable


CONTINUATION_RULES = ("better", "not-worse")  # how a continuation of the champion's line is judged


@dataclass(frozen=True)
class PromotionRule:
    """Promote when the champion's FID minus the candidate's exceeds max(sigmas · σ_gap, min_improvement),
    σ_gap the paired standard error of that gap; without it, the unpaired √(σ_candidate² + σ_champion²).
    `continuation`: "better" judges a continuation of the champion's line the same way; "not-worse"
    promotes it unless its FID exceeds its line's best comparable score by more than the margin. A rule
    recorded before this setting existed reads as "better", the behaviour it was recorded with."""

    sigmas: float
    min_improvement: float
    continuation: str = "better"

    def __post_init__(self) -> None:
        if self.continuation not in CONTINUATION_RULES:
            raise ConfigError(f"continuation={self.continuation!r} is unknown; choose one of "
                              f"{', '.join(CONTINUATION_RULES)}")

    def margin(self, candidate: Score, champion: Score, gap_std: float | None = None) -> float:
        spread = math.hypot(candidate.fid_std, champion.fid_std) if gap_std is None else gap_std
        return max(self.sigmas * spread, self.min_improvement)

    def __str__(self) -> str:
        text = (f"promote if champion FID − candidate FID > max({self.sigmas:g}·σ_gap, {self.min_improvement:g}); "
                "σ_gap: the gap's paired bootstrap standard error (unpaired √(σ_candidate² + σ_champion²) when "
                "either sample set is missing)")
        if self.continuation == "not-worse":
            text += ("; a continuation of the champion's line: promote unless its FID exceeds its line's best "
                     "comparable score by more than that margin")
        return text


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    candidate: Score
    champion_version: str | None
    champion: Score | None
    rule: PromotionRule
    gap_std: float | None = None  # the paired σ_gap the margin used; None: unpaired (or no comparison)
    margin: float | None = None  # the margin the gain was held against; None when there was no comparison
    basis: str = "improvement"  # "improvement", or "continuation" (judged not-worse against its line's best)
    compared_version: str | None = None  # the version the gain was measured against (the champion, or the line's best)

    @property
    def candidate_fid(self) -> float:
        return self.candidate.fid

    @property
    def champion_fid(self) -> float | None:
        return None if self.champion is None else self.champion.fid

    def tags(self) -> dict[str, str]:
        previous = self.champion
        return {"champion.decision": "promoted" if self.promoted else "kept", "champion.reason": self.reason,
                "champion.rule": str(self.rule),
                "champion.candidate_fid": repr(self.candidate.fid),
                "champion.candidate_fid_std": repr(self.candidate.fid_std),
                "champion.previous_version": self.champion_version or "none",
                "champion.previous_fid": "none" if previous is None else repr(previous.fid),
                "champion.previous_fid_std": "none" if previous is None else repr(previous.fid_std),
                "champion.gap_std": "none" if self.gap_std is None else repr(self.gap_std),
                "champion.margin": "none" if self.margin is None else repr(self.margin),
                "champion.basis": self.basis,
                "champion.compared_version": self.compared_version or "none"}


def judge(score: Score, champion_version: str | None, champion: Score | None, rule: PromotionRule,
          gap_spread: GapSpread | None = None, line: Sequence[tuple[str, Score | None]] = ()) -> Decision:
    """The decision on `score` against the champion's; `gap_spread(reference, score)` measures σ_gap
    (only when the two are comparable). `line`: the candidate's ancestors, nearest first (lineage_of); when
    it holds the champion and the rule's continuation is "not-worse", the candidate is judged against the
    lowest comparable score of that line (see the module doc)."""
    def decide(promoted: bool, reason: str, gap_std: float | None = None, margin: float | None = None,
               basis: str = "improvement", compared: str | None = None) -> Decision:
        return Decision(promoted, reason, score, champion_version, champion, rule, gap_std, margin, basis, compared)

    if champion_version is None:
        return decide(True, "no champion yet")
    if champion is None or champion.protocol != score.protocol:
        differs = sorted(k for k in PROTOCOL_KEYS if champion is None or champion.protocol[k] != score.protocol[k])
        return decide(False, f"champion v{champion_version} was scored differently ({', '.join(differs)}): "
                      "not comparable, kept (re-score it under this protocol: python -m flows.rescore)")
    continues = rule.continuation == "not-worse" and champion_version in [version for version, _ in line]
    reference_version, reference = champion_version, champion
    if continues:  # the line's lowest comparable score, the champion's on a tie
        for version, ancestor in line:
            if ancestor is not None and ancestor.protocol == score.protocol and ancestor.fid < reference.fid:
                reference_version, reference = version, ancestor
    gap_std = gap_spread(reference, score) if gap_spread is not None else None
    margin = rule.margin(score, reference, gap_std)
    gain = reference.fid - score.fid
    spread = (f"paired σ_gap {gap_std:.2g}" if gap_std is not None
              else f"unpaired √(σ² + σ²) {math.hypot(score.fid_std, reference.fid_std):.2g}")
    against = (f"champion v{champion_version}'s" if reference_version == champion_version
               else f"v{reference_version}'s (the best of champion v{champion_version}'s line)")
    scores = f"FID {score.fid:.4g} ± {score.fid_std:.2g} vs {against} {reference.fid:.4g} ± {reference.fid_std:.2g}"
    if continues:
        promoted = -gain <= margin  # a NaN FID is never promoted
        verdict = "not worse beyond" if promoted else "worse beyond"
        return decide(promoted, f"continues champion v{champion_version}'s line: {scores}: change {-gain:+.3g}, "
                      f"{verdict} the margin {margin:.3g} ({spread})", gap_std, margin, "continuation",
                      reference_version)
    better = gain > margin  # a NaN FID is never better
    verdict = "beyond" if better else "within"
    return decide(better, f"{scores}: gain {gain:.3g} {verdict} the margin {margin:.3g} ({spread})", gap_std, margin,
                  compared=champion_version)


def _ensure_single_slot_limit(limit: str) -> None:
    """The global concurrency limit `limit` with one slot: created when missing (a concurrent creator's
    conflict is fine); an existing one that would not serialise is an error naming the fix."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as prefect:
        try:
            existing = prefect.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            try:
                prefect.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
            except ObjectAlreadyExists:
                pass
            return
    if existing.limit != 1 or not existing.active:
        raise RuntimeError(f"Prefect global concurrency limit {limit!r} has limit {existing.limit}, "
                           f"active={existing.active}; champion decisions need one active slot: "
                           f"prefect gcl update {limit} --limit 1 --enable")


@contextlib.contextmanager
def champion_lock(name: str, timeout_s: float = LOCK_TIMEOUT_S, lease_s: float = LOCK_LEASE_S) -> Iterator[None]:
    """Hold the one slot of `champion-<name>` (Prefect server-side lease: other processes and machines
    on the same Prefect API wait for it)."""
    from prefect.concurrency.sync import concurrency

    limit = f"champion-{name}"
    _ensure_single_slot_limit(limit)
    # strict: the limit must exist (it does: ensured above). A lease renewal that fails must not cancel the
    # block half-way through its writes (alias moved, tags not yet written); the lease outlasts any decision.
    with concurrency(limit, occupy=1, timeout_seconds=timeout_s, lease_duration=lease_s, strict=True,
                     raise_on_lease_renewal_failure=False):
        yield


def record_score(client: MlflowClient, name: str, version: str, score: Score) -> None:
    for key, value in score.tags().items():
        client.set_model_version_tag(name, version, key, value)


def resolve_version(client: MlflowClient, name: str, version: str | None, alias: str) -> str:
    """`version` as given, else the version `alias` points at; a ConfigError names the aliases there are."""
    if version is not None:
        return str(version)
    aliases = client.get_registered_model(name).aliases
    if alias not in aliases:
        raise ConfigError(f"registered model {name!r} has no alias {alias!r} (it has: "
                          f"{', '.join(sorted(aliases)) or 'none'}); give a version")
    return str(aliases[alias])


def version_parser(prog: str, description: str | None, verb: str) -> argparse.ArgumentParser:
    """A command line that names one registered version: --model and --version, or --alias (default
    champion), for resolve_version; `verb` says what the command does to it ("re-score", "sample", …)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered model name, e.g. ddpm-mnist-cond")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", help=f"version to {verb}")
    which.add_argument("--alias", default=CHAMPION, help=f"alias of the version to {verb} (default: champion)")
    return parser


def version_score(client: MlflowClient, name: str, version: str) -> Score | None:
    """The score tagged on `version`; where it does not name its run (scored before runs were recorded),
    the run that holds its samples: its re-score's, else the run that registered it."""
    return _score_of(client.get_model_version(name, version))


def _score_of(model_version) -> Score | None:
    """version_score of an MLflow ModelVersion already read."""
    score = Score.from_tags(model_version.tags)
    if score is None or score.run_id:
        return score
    return replace(score, run_id=model_version.tags.get("eval.rescored_by") or model_version.run_id or None)


def current_champion(client: MlflowClient, name: str) -> tuple[str | None, Score | None]:
    """(version, score) of the version `champion` points at, or (None, None)."""
    version = client.get_registered_model(name).aliases.get(CHAMPION)
    if version is None:
        return None, None
    return str(version), version_score(client, name, str(version))


def rolled_back_from(tags: Mapping[str, str], version: str) -> bool:
    """Whether `version` (with `tags`) is withdrawn: its last rollback record moved the champion away from it."""
    records = sorted(key for key in tags if key.startswith(ROLLBACK_TAG))
    return bool(records) and json.loads(tags[records[-1]]).get("from") == version


def lineage_of(client: MlflowClient, name: str, version: str) -> list[tuple[str, Score | None]]:
    """`version`'s ancestors along its `lineage.parent` tags, nearest first, with their current scores. The
    line ends before a deleted ancestor and before one the champion was rolled back from (a withdrawn line
    is not the champion's)."""
    line: list[tuple[str, Score | None]] = []
    parent = client.get_model_version(name, version).tags.get(PARENT_TAG, "none")
    while parent != "none" and parent not in [v for v, _ in line] and parent != version:
        try:
            model_version = client.get_model_version(name, parent)
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            break
        if rolled_back_from(model_version.tags, parent):
            break
        line.append((parent, _score_of(model_version)))  # one registry read per ancestor
        parent = model_version.tags.get(PARENT_TAG, "none")
    return line


def select_champion(client: MlflowClient, name: str, version: str, score: Score, rule: PromotionRule,
                    gap_spread: GapSpread | None = None) -> Decision:
    """Tag `version` with its score; under the model's champion lock, compare it with the current
    champion by `rule` (the model's gate; a continuation of the champion's line under "not-worse": with
    its line's best, see judge) with the paired σ_gap that `gap_spread(reference, score)` measures
    (unpaired without it, or where it returns None), tag the decision on the version and, if it wins,
    point `previous` at the champion it replaces and move `champion` to it (the last write)."""
    record_score(client, name, version, score)
    with champion_lock(name):
        champion_version, champion = current_champion(client, name)
        line = lineage_of(client, name, version) if rule.continuation == "not-worse" else []
        decision = judge(score, champion_version, champion, rule, gap_spread, line)
        for key, value in decision.tags().items():
            client.set_model_version_tag(name, version, key, value)
        described = client.get_model_version(name, version).description
        client.update_model_version(name, version, description="\n\n".join(filter(None, (
            described, f"**Gate:** {decision.tags()['champion.decision']}: {decision.reason}."))))
        if decision.promoted:
            if champion_version is not None:  # the champion it replaces stays one command away (flows.rollback)
                client.set_registered_model_alias(name, PREVIOUS, champion_version)
            client.set_registered_model_alias(name, CHAMPION, version)
    return decision


def rescore_version(client: MlflowClient, name: str, version: str, score: Score, run_id: str) -> Score | None:
    """Replace `version`'s score with `score` (measured by run `run_id`) under the model's champion lock,
    keeping the score it had as the next `eval.history.<n>` entry; return that previous score."""
    with champion_lock(name):
        tags = client.get_model_version(name, version).tags
        previous = Score.from_tags(tags)
        if previous is not None:
            entry = len([key for key in tags if key.startswith(SCORE_HISTORY_TAG)]) + 1
            client.set_model_version_tag(name, version, f"{SCORE_HISTORY_TAG}{entry:04d}", json.dumps(
                {**previous.tags(), "replaced_by": run_id, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
        record_score(client, name, version, score)
        client.set_model_version_tag(name, version, "eval.rescored_by", run_id)
    return previous
