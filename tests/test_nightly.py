"""Nights through the real flow: a fresh first night, a night with nothing new that skips, and a night after images
were added at the source that continues the champion's line on the new data and re-scores the
champion on it before comparing. Its own registry (a fresh MLflow store) and its own data folder."""

from __future__ import annotations

import math
import shutil

import pytest
from mlflow import MlflowClient

from conftest import grow_mnist_source
from diffusion_core import ConfigError, prepare_dataset
from diffusion_core.checkpoint import load_training_checkpoint
from flows.registry import CHAMPION
from flows.train_eval import train_eval

NIGHT = {"diffusion.timesteps": 20, "sample.steps": 5, "train.steps": 10}  # smoke: batch 16
MODEL = "ddpm-mnist"


@pytest.fixture()
def registry(pipeline, tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DIFFUSION_ARTIFACT_LOCATION", str(tmp_path / "artifacts"))
    shutil.copytree(data_dir, tmp_path / "data")
    monkeypatch.setenv("DIFFUSION_DATA_DIR", str(tmp_path / "data"))
    return MlflowClient()


def _night(client: MlflowClient, policy: str):
    state = train_eval(preset="smoke", overrides=NIGHT, num_samples=16, policy=policy, return_state=True)
    run = client.get_run(state.result())
    return state, run


def test_nights_skip_when_nothing_is_new_and_continue_on_new_data(registry, mnist_raw_source, tmp_path, monkeypatch):
    client = registry
    first_state, first = _night(client, "continue")
    assert first.data.tags["night.mode"] == "fresh" and "no champion yet" in first.data.tags["night.reason"]
    v1 = client.get_model_version(MODEL, first.data.tags["model_version"])
    v1_version = str(v1.version)
    assert (v1.tags["lineage.parent"], v1.tags["lineage.runs"], v1.tags["lineage.images_seen"]) == ("none", "1", "160")
    assert str(client.get_registered_model(MODEL).aliases[CHAMPION]) == v1_version

    skipped_state, skipped = _night(client, "skip-unchanged")  # same data, code and config as the champion
    assert skipped_state.is_completed() and skipped_state.name == "Skipped"
    assert f"nothing new since champion v{v1_version}" in skipped_state.message
    assert skipped.data.tags["night.mode"] == "skip" and skipped.data.tags["mlflow.note.content"].startswith("Skipped")
    assert "model_version" not in skipped.data.tags and "train_seconds" not in skipped.data.metrics
    assert [str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")] == [v1_version]

    grown = grow_mnist_source(mnist_raw_source, tmp_path / "source", added=64)
    monkeypatch.setenv("DIFFUSION_DATA_SOURCE", str(grown))
    new_sha = prepare_dataset("mnist", str(grown), tmp_path / "independent").sha256
    _, third = _night(client, "skip-unchanged")
    tags = third.data.tags
    assert tags["night.mode"] == "continue" and f"→ {new_sha[:12]}" in tags["night.reason"]
    assert third.data.params["dataset_sha256"] == new_sha
    v2 = client.get_model_version(MODEL, tags["model_version"])
    assert (v2.tags["lineage.parent"], v2.tags["lineage.runs"], v2.tags["lineage.images_seen"]) == (v1_version, "2", "320")
    assert v2.tags["dataset_sha256"] == new_sha
    # the version page's description says the same in words, then what the gate decided
    assert v1.description.startswith("**Lineage:** trained from scratch; 160 images seen in 1 run (nights)")
    assert v2.description.startswith(f"**Lineage:** continued v{v1_version}; 320 images seen in 2 runs (nights)")
    assert f"**Gate:** {tags['champion.decision']}: {tags['champion.reason']}." in v2.description
    assert float(v2.tags["lineage.train_seconds"]) == pytest.approx(
        float(v1.tags["lineage.train_seconds"]) + third.data.metrics["train_seconds"], abs=0.11)
    state = load_training_checkpoint(client.download_artifacts(third.info.run_id, "checkpoints/last.safetensors",
                                                               str(tmp_path)))
    assert (state.step, state.start_step, state.dataset_sha256) == (20, 10, new_sha)
    # the champion was re-scored on the new data before the comparison, which then compared like with like
    champion = client.get_model_version(MODEL, v1_version).tags
    assert champion["eval.dataset_sha256"] == new_sha and "eval.history.0001" in champion
    assert "scored differently" not in tags["champion.reason"]
    # ... and the gate held the gap against its paired standard error, from the samples of the champion's re-score
    # and of this run (both drawn from the gate's sampling seed, so σ_gap sits below the unpaired error)
    assert champion["eval.run_id"] == champion["eval.rescored_by"] and v2.tags["eval.run_id"] == third.info.run_id
    gap_std = float(tags["champion.gap_std"])
    assert 0 < gap_std < math.hypot(float(tags["champion.candidate_fid_std"]), float(tags["champion.previous_fid_std"]))
    assert float(tags["champion.margin"]) == pytest.approx(2 * gap_std) and "paired σ_gap" in tags["champion.reason"]


def test_an_unknown_policy_is_refused_before_any_work(pipeline):
    with pytest.raises(ConfigError, match="policy='nightly' is unknown; choose one of continue, fresh, skip-unchanged"):
        train_eval(preset="smoke", overrides=NIGHT, policy="nightly")
