"""evaluate: FID and the other sample-quality metrics of the run's samples, as MLflow metrics of the run.

Reads the uint8 sample tensors that `sample` logged (`samples/<tag>.safetensors`) and scores each
against the real test split with diffusion_core.evaluation. Metrics are named
`<metric>_<extractor>_<tag>` (e.g. `fid_lenet_ddim50`). The primary setting's scores (the sampler that
decides the champion, on `evaluation.num_samples` images, with FID's bootstrap standard error) are also
logged under the same headline keys on every run (`fid`, `fid_std`, `kid`, `kid_std`, `precision`,
`recall`, `confident`, `class_entropy`; conditional: `class_consistency`), so runs share sortable
columns in the MLflow UI whatever their sampler. What the headline depends on (extractor_id,
num_samples, dataset_sha256, reference split, the primary protocol) becomes `eval.*` params; the whole
result is also kept as the artifact `evaluation.json`. Sample tensors that carry `labels` (class-
conditional models) also get class_consistency and per-class FIDs, and the guidance sweep is plotted as
`guidance_sweep.png`; FID against network evaluations (DDPM, and DDIM / DPM-Solver++ at
`sample.nfe_sweep`) as `fid_vs_nfe.png`. The primary setting's N (`evaluation.num_samples`) differs from
the others' (`sample.num_samples`), and FID's bias with it, so the plots draw it as a point of its own,
each line and point labelled with its N.

`gap_spread` measures, for the promotion gate, the paired standard error of the FID gap between the
champion's scored samples and a candidate's (both runs' `samples/<primary tag>.safetensors`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger
from safetensors.torch import load_file

from diffusion_core.config import Config, config_from_dict
from diffusion_core.evaluation import evaluate, format_table
from diffusion_core.evaluation.evaluator import fid_gap_std, sampler_tag
from diffusion_core.evaluation.plots import plot_fid_vs_nfe, plot_guidance_sweep

from .registry import GapSpread, Score
from .sample import SAMPLES_ARTIFACT, primary_setting
from .tracking import log_metrics, log_params, upload_artifacts

RESULT_ARTIFACT = "evaluation.json"
GUIDANCE_PLOT = "guidance_sweep.png"  # conditional models: FID and class consistency against w
NFE_PLOT = "fid_vs_nfe.png"  # with sample.nfe_sweep: FID against network evaluations per sampler
# Headline metric key → the evaluator's metric name (keyed `<name>_<extractor>_<primary tag>`).
HEADLINE_METRICS = {"fid": "fid", "fid_std": "fid_std", "kid": "kid", "kid_std": "kid_std", "precision": "precision",
                    "recall": "recall", "confident": "confident_fraction", "class_entropy": "class_entropy",
                    "class_consistency": "class_consistency"}


def headline_metrics(metrics: dict[str, float], extractor: str, primary_tag: str) -> dict[str, float]:
    """The primary setting's scores under run-independent keys (those it has)."""
    found = {key: metrics.get(f"{name}_{extractor}_{primary_tag}") for key, name in HEADLINE_METRICS.items()}
    return {key: value for key, value in found.items() if value is not None}


@flow(name="evaluate")
def evaluate_samples(run_id: str, config: dict[str, Any], extractor: str = "lenet") -> None:
    """Score every sample tensor of the run with `extractor` ("lenet" offline, or "inception") under the
    run's `config` (as submitted)."""
    client = MlflowClient()
    config = config_from_dict(config)
    primary = primary_setting(config)
    metrics: dict[str, float] = {}
    sizes: dict[str, int] = {}  # images per tag: the plots never join points of different N
    context: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(run_id, SAMPLES_ARTIFACT, tmp))
        for tensor_file in sorted(folder.glob("*.safetensors")):
            tag = tensor_file.stem
            tensors = load_file(str(tensor_file))
            sizes[tag] = len(tensors["images"])
            result = evaluate(tensors["images"], labels=tensors.get("labels"), data=config.data, extractor=extractor,
                              tag=tag, device=config.train.device, progress=False, seed=primary.settings.seed,
                              bootstrap=config.evaluation.bootstrap if tag == primary.tag else 0)
            metrics.update({k: v for k, v in result.items() if f"_{tag}" in k})
            if tag == primary.tag:
                context = {k: v for k, v in result.items() if f"_{tag}" not in k}
        if not context:
            raise RuntimeError(f"run {run_id} has no {SAMPLES_ARTIFACT}/{primary.tag}.safetensors (the primary "
                               "setting's samples): run `sample` first")
        result_file = Path(tmp) / RESULT_ARTIFACT
        result_file.write_text(json.dumps({**context, **metrics}, indent=2, sort_keys=True))
        upload_artifacts(client, run_id, result_file)
        primary_tag = sampler_tag(primary.settings.sampler, primary.settings.steps)
        for png in (plot_guidance_sweep(metrics, extractor, primary_tag, Path(tmp) / GUIDANCE_PLOT, sizes),
                    plot_fid_vs_nfe(metrics, extractor, Path(tmp) / NFE_PLOT, sizes, primary.guidance)):
            if png is not None:
                upload_artifacts(client, run_id, png)
    log_metrics(client, run_id, {**metrics, **headline_metrics(metrics, extractor, primary.tag)})
    log_params(client, run_id, {**{f"eval.{k}": v for k, v in context.items()}, "eval.primary": primary.protocol})
    get_run_logger().info("evaluation (%s):\n%s", context.get("extractor_id"), format_table(metrics))


def gap_spread(client: MlflowClient, config: Config, extractor: str) -> GapSpread:
    """σ_gap of two scores under `config`'s protocol (the gate's): the paired bootstrap standard error of
    FID(candidate) − FID(champion) from the primary samples of the runs that scored them, with the
    protocol's bootstrap count and seed. None (the gate then uses the unpaired error) when the protocol
    has no bootstrap, a score names no run, a run's samples cannot be read or the two sets differ in size;
    the log says which of the last three."""
    primary = primary_setting(config)
    artifact = f"{SAMPLES_ARTIFACT}/{primary.tag}.safetensors"

    def spread(champion: Score, candidate: Score) -> float | None:
        logger = get_run_logger()
        if config.evaluation.bootstrap < 2:
            return None  # no bootstrap, no standard error (a gate with sigmas > 0 keeps one: flows.gate)
        if not champion.run_id or not candidate.run_id:
            logger.warning("no paired σ_gap: a score names no run (champion %s, candidate %s)", champion.run_id,
                           candidate.run_id)
            return None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                images = [load_file(client.download_artifacts(run, artifact, f"{tmp}/{k}"))["images"]
                          for k, run in enumerate((champion.run_id, candidate.run_id))]
            except (MlflowException, OSError) as exc:
                logger.warning("no paired σ_gap: %s of runs %s and %s could not be read (%s)", artifact,
                               champion.run_id, candidate.run_id, exc)
                return None
        if images[0].shape != images[1].shape:
            logger.warning("no paired σ_gap: the scored sets differ in shape (%s, %s)", tuple(images[0].shape),
                           tuple(images[1].shape))
            return None
        return fid_gap_std(images[0], images[1], data=config.data, extractor=extractor,
                           bootstrap=config.evaluation.bootstrap, seed=primary.settings.seed,
                           device=config.train.device)

    return spread
