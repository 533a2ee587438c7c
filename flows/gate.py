"""The promotion gate of a registered model: the rule that turns two scores into a promotion, and the
protocol every candidate is scored with. Both belong to the registered model, not to the runs it judges.

The gate is kept as tags of the registered model: `gate` (the current one, as JSON: rule, protocol, who
changed it, when and why, its revision) and `gate.history.<revision>` (every revision, the current one
included). A registered model gets its gate when the first train-eval run that registers into it is
submitted: the project's rule (DEFAULT_RULE) and that run's protocol (the extractor, the evaluation
budget and the primary sampler's settings: PROTOCOL_KEYS of its config), recorded as made by that run.
From then on every run of that model is sampled and scored under the gate's protocol and judged by the
gate's rule, whatever its parameters say; a run whose explicit settings contradict the gate is refused
before any work. The gate changes only through this module's maintenance command, which records who
(`$DIFFUSION_OPERATOR`, else the login name), when and why:

    python -m flows.gate show --model ddpm-mnist-cond
    python -m flows.gate set --model ddpm-mnist-cond --set evaluation.num_samples=2000 --reason "N = 2,000 from now on"
    python -m flows.gate set --model ddpm-mnist-cond --promotion-sigmas 3 --min-improvement 0.5 --reason "…"
    python -m flows.gate set --model ddpm-mnist-cond --continuation better --reason "nights must beat the champion"

After a protocol change, re-score the champion (`python -m flows.rescore --model ddpm-mnist-cond`):
until then new versions are not comparable with it and are kept. A gate whose `gate` tag differs from
its last history entry was edited outside this command: runs refuse it until `set` writes a new
revision.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from diffusion_core.config import Config, ConfigError, config_from_dict, parse_override
from diffusion_core.evaluation.extractors import canonical_name

from .registry import CONTINUATION_RULES, PromotionRule, champion_lock

GATE_TAG = "gate"
HISTORY_TAG = "gate.history."
OPERATOR_ENV = "DIFFUSION_OPERATOR"
# 2 paired standard errors (docs/evaluation.md#model-comparison); a night continuing the champion's line is
# promoted unless worse than its line's best beyond that margin (flows.registry; docs/operations.md#the-gate-and-continued-training)
DEFAULT_RULE = PromotionRule(sigmas=2.0, min_improvement=0.0, continuation="not-worse")
# What the protocol fixes: the feature extractor, the evaluation budget and the primary sampler's settings.
PROTOCOL_KEYS = ("extractor", "evaluation.num_samples", "evaluation.bootstrap", "sample.sampler", "sample.steps",
                 "sample.eta", "sample.spacing", "sample.levels_log_snr", "sample.guidance", "sample.seed",
                 "sample.clip_x0", "sample.sde_noise")
# Keys added to PROTOCOL_KEYS after gates were written, with the value every run had before: a gate without one
# fixed it implicitly, so it goes on scoring with that value.
IMPLICIT_PROTOCOL = {"sample.levels_log_snr": [], "sample.sde_noise": 1.0}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def operator() -> str:
    """Who is changing the gate: $DIFFUSION_OPERATOR, else the login name."""
    return os.environ.get(OPERATOR_ENV) or getpass.getuser()


def protocol_of(config: Config, extractor: str) -> dict[str, Any]:
    """The protocol a config scores its primary setting with (steps and spacing resolved)."""
    sample = config.sample.resolved(config.diffusion.timesteps)
    flat = {**config.flat(), "sample.steps": sample.steps, "sample.spacing": sample.spacing}
    if not config.conditional:
        flat["sample.guidance"] = 0.0
    return {"extractor": canonical_name(extractor, config.data.dataset),
            **{key: flat[key] for key in PROTOCOL_KEYS if key != "extractor"}}


@dataclass(frozen=True)
class Gate:
    """A registered model's rule and protocol, and the record of who set them."""

    rule: PromotionRule
    protocol: dict[str, Any]
    revision: int
    by: str
    at: str
    reason: str

    def to_json(self) -> str:
        return json.dumps({"rule": dataclasses.asdict(self.rule),
                           "protocol": self.protocol, "revision": self.revision, "by": self.by, "at": self.at,
                           "reason": self.reason}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Gate:
        data = json.loads(text)
        return cls(PromotionRule(**data["rule"]), data["protocol"], data["revision"], data["by"], data["at"],
                   data["reason"])

    @property
    def extractor(self) -> str:
        return self.protocol["extractor"]

    def apply(self, config: Config) -> Config:
        """`config` with the gate's protocol; a ConfigError names what does not fit the config (say, more
        sampler steps than diffusion.timesteps)."""
        tree = config.to_dict()
        for key, value in {**IMPLICIT_PROTOCOL, **self.protocol}.items():
            if key != "extractor":
                section, field = key.split(".")
                tree[section][field] = value
        try:
            return config_from_dict(tree)
        except ConfigError as exc:
            raise ConfigError(f"this run's config cannot be scored under its registered model's gate "
                              f"(revision {self.revision}): {exc}; change the gate with python -m flows.gate set"
                              ) from exc

    def check_overrides(self, name: str, overrides: dict[str, Any], extractor: str | None, dataset: str) -> None:
        """Refuse explicit settings that contradict the gate (ConfigError naming key, value and the gate's value),
        including the values an older gate fixed implicitly (IMPLICIT_PROTOCOL), which `apply` would put back."""
        asked = {**overrides, **({"extractor": canonical_name(extractor, dataset)} if extractor else {})}
        protocol = {**IMPLICIT_PROTOCOL, **self.protocol}
        for key, value in asked.items():
            if key in protocol and value != protocol[key]:
                raise ConfigError(
                    f"parameter {key} refused: registered model {name} scores every candidate with {key}="
                    f"{protocol[key]!r} (its gate, revision {self.revision}), got {value!r}; leave it unset, or "
                    f"change the gate first: python -m flows.gate set --model {name} --set {key}=… --reason …")


def _validated(protocol: dict[str, Any]) -> None:
    """Refuse protocol values the config would refuse (ConfigError naming the setting)."""
    tree: dict[str, dict[str, Any]] = {"sample": {}, "evaluation": {}}
    for key, value in protocol.items():
        if key != "extractor":
            section, field = key.split(".")
            tree[section][field] = value
    config_from_dict(tree)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def read_gate(client: MlflowClient, name: str) -> Gate | None:
    """The model's current gate (None when it has none); a ConfigError when its `gate` tag does not match
    the last revision of its history (edited outside the maintenance command)."""
    tags = client.get_registered_model(name).tags
    if GATE_TAG not in tags:
        return None
    history = sorted(key for key in tags if key.startswith(HISTORY_TAG))
    if not history or tags[history[-1]] != tags[GATE_TAG]:
        raise ConfigError(f"registered model {name}'s gate tag does not match its last history entry "
                          f"({history[-1] if history else 'none'}): it was edited outside python -m flows.gate; "
                          f"write a new revision with python -m flows.gate set --model {name} --reason …")
    return Gate.from_json(tags[GATE_TAG])


def _write(client: MlflowClient, name: str, gate: Gate) -> None:
    """History first, then the current gate: an interrupted write leaves the old gate in force."""
    text = gate.to_json()
    client.set_registered_model_tag(name, f"{HISTORY_TAG}{gate.revision:04d}", text)
    client.set_registered_model_tag(name, GATE_TAG, text)


def history(client: MlflowClient, name: str) -> list[Gate]:
    tags = client.get_registered_model(name).tags
    return [Gate.from_json(tags[key]) for key in sorted(key for key in tags if key.startswith(HISTORY_TAG))]


def ensure_gate(client: MlflowClient, name: str, config: Config, extractor: str, by: str) -> Gate:
    """The model's gate; a model without one (new, or registered before gates existed) gets one from
    `config`'s protocol and the project's rule, recorded as made `by` (under the model's champion lock,
    so two first runs agree on one gate)."""
    _ensure_registered_model(client, name)
    gate = read_gate(client, name)
    if gate is not None:
        return gate
    with champion_lock(name):
        gate = read_gate(client, name)
        if gate is None:
            gate = Gate(DEFAULT_RULE, protocol_of(config, extractor), 1, by, _now(),
                        "first protocol of this model: the protocol of the run that created it")
            _write(client, name, gate)
    return gate


def change_gate(client: MlflowClient, name: str, reason: str, protocol: dict[str, Any] | None = None,
                sigmas: float | None = None, min_improvement: float | None = None, by: str | None = None,
                continuation: str | None = None) -> Gate:
    """Write a new revision of `name`'s gate: `protocol` changes (PROTOCOL_KEYS only) and the rule's
    parameters where given; records who, when and why, and keeps every earlier revision."""
    if not reason.strip():
        raise ConfigError("a gate change needs --reason: it is kept in the model's history")
    unknown = sorted(set(protocol or {}) - set(PROTOCOL_KEYS))
    if unknown:
        raise ConfigError(f"a gate fixes only {', '.join(PROTOCOL_KEYS)}; not {', '.join(unknown)}")
    rule_changes = {k: v for k, v in {"sigmas": sigmas, "min_improvement": min_improvement}.items() if v is not None}
    if any(v < 0 for v in rule_changes.values()):
        raise ConfigError(f"promotion sigmas and minimum improvement must be >= 0, got {rule_changes}")
    if continuation is not None:
        PromotionRule(0.0, 0.0, continuation)  # refuses an unknown value (ConfigError) before the lock
        rule_changes["continuation"] = continuation
    with champion_lock(name):
        try:
            current = read_gate(client, name)
        except ConfigError:  # edited outside this command: the new revision continues the recorded history
            recorded = history(client, name)
            current = recorded[-1] if recorded else None
        if current is None:
            raise ConfigError(f"registered model {name} has no gate yet: its first train-eval run creates one")
        new_protocol = {**current.protocol, **(protocol or {})}
        new_protocol["extractor"] = canonical_name(str(new_protocol["extractor"]), "")
        _validated(new_protocol)
        rule = dataclasses.replace(current.rule, **rule_changes)
        if rule.sigmas > 0 and new_protocol["evaluation.bootstrap"] == 0:
            raise ConfigError("a rule with promotion sigmas > 0 needs FID's standard error: keep "
                              "evaluation.bootstrap >= 10")
        gate = Gate(rule, new_protocol, current.revision + 1, by or operator(), _now(), reason)
        _write(client, name, gate)
    return gate


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.gate`: show or change a registered model's gate (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m flows.gate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="the current gate and its history")
    show.add_argument("--model", required=True, help="registered model name, e.g. ddpm-mnist-cond")
    change = commands.add_parser("set", help="write a new revision of the gate")
    change.add_argument("--model", required=True)
    change.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"change one protocol setting (repeatable): {', '.join(PROTOCOL_KEYS)}")
    change.add_argument("--promotion-sigmas", type=float, help="k of the rule: the FID must drop by more than "
                        "k·σ_gap (the gap's paired standard error)")
    change.add_argument("--min-improvement", type=float, help="… and by at least this much (FID units)")
    change.add_argument("--continuation", choices=CONTINUATION_RULES,
                        help="a version continuing the champion's line: 'better' (judged like any other) or "
                             "'not-worse' (promoted unless worse than its line's best beyond the margin)")
    change.add_argument("--reason", required=True, help="why (kept in the history)")
    args = parser.parse_args(argv)
    client = MlflowClient()
    if args.command == "show":
        for gate in history(client, args.model):
            print(gate.to_json())
        return
    gate = change_gate(client, args.model, args.reason, dict(parse_override(o) for o in args.overrides),
                       args.promotion_sigmas, args.min_improvement, continuation=args.continuation)
    print(f"{args.model} gate revision {gate.revision}: {gate.rule}; protocol {json.dumps(gate.protocol)}")


if __name__ == "__main__":
    main()
