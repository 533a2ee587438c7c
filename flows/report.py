"""report: what a train-eval run measured and decided, as Prefect artifacts of its flow run.

Two artifacts per run, keyed by the registered model so that Prefect keeps each model's history
(the UI's Artifacts page lists every version of a key):

- `train-eval-<model>` (markdown): the primary FID ± its bootstrap standard error σ at its N, the
  champion's before the decision, the decision and its reason, the rule, and links to the MLflow run,
  the model version and the primary sample grid in the artifact store. With an http(s) tracking server
  the links open its UI and the grid is shown (the server's `get-artifact` URL); with a local store
  they are the run id, the `models:/` URI and the grid's artifact URI.
- `scores-<model>` (table): one row per sampler setting (tag, protocol, N), its scores to 4
  significant digits and its sampling speed; the run's MLflow metrics hold the full values.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow import MlflowClient
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from diffusion_core.config import Config
from diffusion_core.evaluation.evaluator import TABLE_COLUMNS

from .registry import Decision
from .sample import SAMPLES_ARTIFACT, SamplerSetting, primary_setting, sampler_settings

SUMMARY_PREFIX, SCORES_PREFIX = "train-eval", "scores"


def artifact_key(prefix: str, model: str) -> str:
    """`<prefix>-<model>`: a Prefect artifact key (lowercase letters, digits and dashes only)."""
    key = f"{prefix}-{model}"
    if not re.fullmatch(r"[a-z0-9-]+", key):
        raise ValueError(f"Prefect artifact key {key!r} may hold only lowercase letters, digits and dashes: "
                         "rename the registered model")
    return key


def server_url(tracking_uri: str) -> str | None:
    """The tracking server's address without credentials or a trailing slash; None when the tracking URI
    is no http(s) server (a SQLite file, a folder)."""
    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return None
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/"), "", ""))


def run_markdown(server: str | None, experiment_id: str, run_id: str) -> str:
    """Markdown for an MLflow run: a link to its page on `server`, or its id (a local store has no UI)."""
    if server is None:
        return f"`{run_id}`"
    return f"[{run_id}]({server}/#/experiments/{experiment_id}/runs/{run_id})"


@dataclass(frozen=True)
class RunLinks:
    """Where a run's results are: the MLflow UI at `server` (None: a local store, no UI to link to)."""

    server: str | None
    experiment_id: str
    run_id: str
    model: str
    version: str
    artifact_uri: str  # the run's artifact root
    grid_path: str  # the primary sample grid, under the artifact root

    @property
    def grid_uri(self) -> str:
        return f"{self.artifact_uri.rstrip('/')}/{self.grid_path}"

    def run(self) -> str:
        """Markdown for the MLflow run: a link to its page, or its id."""
        return run_markdown(self.server, self.experiment_id, self.run_id)

    def model_version(self) -> str:
        """Markdown for the registered version: a link to its page, or its `models:/` URI."""
        if self.server is None:
            return f"`models:/{self.model}/{self.version}`"
        return (f"[{self.model} v{self.version}]({self.server}/#/models/{urllib.parse.quote(self.model)}"
                f"/versions/{self.version})")

    def grid_image(self) -> str | None:
        """An http(s) URL of the grid's bytes (the server reads its artifact store), None for a local store."""
        if self.server is None:
            return None
        query = urllib.parse.urlencode({"path": self.grid_path, "run_uuid": self.run_id})
        return f"{self.server}/get-artifact?{query}"


def _fid(fid: float, std: float) -> tuple[str, str]:
    return f"{fid:.4g}", f"{std:.2g}"


def summary_markdown(decision: Decision, links: RunLinks, start: str = "") -> str:
    """The run's result and the champion decision as markdown (see the module docstring); `start`: what the
    run started from and why (flows.nightly)."""
    candidate, champion = decision.candidate, decision.champion
    name, version = links.model, links.version
    if decision.promoted:
        outcome = f"v{version} is the champion now."
    else:
        outcome = f"v{decision.champion_version} stays the champion; v{version} is kept as a version."
    rows = [(f"this run: v{version}", *_fid(candidate.fid, candidate.fid_std), candidate.protocol)]
    if decision.champion_version is None:
        rows.append(("champion before: none", "–", "–", {}))
    elif champion is None:
        rows.append((f"champion before: v{decision.champion_version}", "not scored", "–", {}))
    else:
        rows.append((f"champion before: v{decision.champion_version}", *_fid(champion.fid, champion.fid_std),
                     champion.protocol))
    lines = [f"## {name} v{version}: {'promoted' if decision.promoted else 'kept'}", "", outcome, "",
             *([f"**Started from:** {start}", ""] if start else []),
             "| | FID | ± σ | N | sampler | extractor |", "|:--|--:|--:|--:|:--|:--|"]
    lines += [f"| {who} | {fid} | {std} | {protocol.get('num_samples', '–')} | {protocol.get('sampler', '–')} "
              f"| {protocol.get('extractor_id', '–')} |" for who, fid, std, protocol in rows]
    lines += ["", "σ: the bootstrap standard error of the FID.", "",
              f"**Decision: {'promoted' if decision.promoted else 'kept'}.** {decision.reason}", "",
              f"Rule (the model's gate): {decision.rule}", "",
              f"- MLflow run: {links.run()}", f"- Model version: {links.model_version()}",
              f"- Sample grid ({links.grid_path}): `{links.grid_uri}`"]
    image = links.grid_image()
    if image is not None:
        lines += ["", f"![{links.grid_path}]({image})"]
    return "\n".join(lines) + "\n"


def _shown(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")


def score_rows(metrics: dict[str, float], settings: list[SamplerSetting], extractor: str,
               primary_tag: str) -> list[dict[str, Any]]:
    """One row per sampler setting: tag, whether it is the primary one, protocol, N, each metric of
    TABLE_COLUMNS that some setting has (`<metric>_<extractor>_<tag>`; None where this one lacks it) and
    images per second, to 4 significant digits."""
    columns = [c for c in TABLE_COLUMNS if any(f"{c}_{extractor}_{s.tag}" in metrics for s in settings)]
    return [{"setting": s.tag, "primary": "yes" if s.tag == primary_tag else "no", "protocol": s.protocol,
             "N": s.settings.num_samples,
             **{c: _shown(metrics.get(f"{c}_{extractor}_{s.tag}")) for c in columns},
             "images_per_s": _shown(metrics.get(f"sampling_images_per_s_{s.tag}"))} for s in settings]


def publish_skip(client: MlflowClient, run_id: str, model: str, reason: str) -> None:
    """The summary artifact of a run that skipped training (flows.nightly's skip-unchanged)."""
    link = run_markdown(server_url(mlflow.get_tracking_uri()), client.get_run(run_id).info.experiment_id, run_id)
    create_markdown_artifact(f"## {model}: skipped\n\n{reason}\n\n- MLflow run: {link}\n",
                             key=artifact_key(SUMMARY_PREFIX, model), description=f"train-eval of {model}: skipped")


def publish_report(client: MlflowClient, run_id: str, config: Config, extractor: str, model: str, version: str,
                   decision: Decision, start: str = "") -> None:
    """Publish the run's summary and score table as keyed artifacts of the current Prefect flow run."""
    run = client.get_run(run_id)
    primary = primary_setting(config)
    links = RunLinks(server_url(mlflow.get_tracking_uri()), run.info.experiment_id, run_id, model, version,
                     run.info.artifact_uri, f"{SAMPLES_ARTIFACT}/{primary.tag}.png")
    create_markdown_artifact(summary_markdown(decision, links, start), key=artifact_key(SUMMARY_PREFIX, model),
                             description=f"train-eval of {model} v{version}: result and champion decision")
    create_table_artifact(score_rows(run.data.metrics, sampler_settings(config), extractor, primary.tag),
                          key=artifact_key(SCORES_PREFIX, model),
                          description=f"{model} v{version}: scores of every sampler setting")
