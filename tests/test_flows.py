"""The train-eval flows on real MNIST, in-process: Prefect's test harness (one per session) and MLflow
on a SQLite file with local artifacts, both in a temporary folder."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from diffusion_core import ConfigError, load_config, prepare_dataset
from diffusion_core.config import SampleConfig
from diffusion_core.launch import write_resolved_config
from diffusion_core.samplers import generate_batches
from flows.gate import DEFAULT_RULE, GATE_TAG, change_gate, history, read_gate
from flows.parameters import PRESET_DIR_ENV
from flows.registry import (CHALLENGER, CHAMPION, PREVIOUS, PromotionRule, Score, load_registered_model,
                            select_champion)
from flows.rollback import rollback
from flows.tracking import ensure_experiment
from flows.train_eval import config_sha256
from flows.train import TrainingFailed
from flows.rescore import rescore
from flows.train_eval import train_eval
from conftest import PIPELINE_SECRET as SECRET

REPO = Path(__file__).resolve().parent.parent
# T = 20 keeps DDPM sampling cheap; DDIM then takes 5 of those steps.
FAST = {"diffusion.timesteps": 20, "sample.steps": 5, "train.steps": 10}


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_train_eval_tracks_registers_and_crowns_the_first_model(pipeline, mnist_raw_source, data_dir, caplog):
    run_id = train_eval(preset="smoke", overrides=FAST, num_samples=32)
    assert any(r.getMessage().startswith("[rank0]: trained to step 10") for r in caplog.records)  # rank-tagged
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "diffusion-mnist"
    assert re.fullmatch(r"smoke-\d{8}-\d{6}-[\w-]+", run.info.run_name)

    params = run.data.params
    # the model's gate, made from this first run, fixes the primary sampler with its spacing resolved
    config = load_config("smoke", {**FAST, "sample.num_samples": 32, "sample.spacing": "linear"})
    assert {k: params[k] for k in config.flat()} == {k: str(v) for k, v in config.flat().items()}
    sha256 = prepare_dataset("mnist", str(mnist_raw_source), data_dir).sha256
    assert params["dataset_sha256"] == params["eval.dataset_sha256"] == sha256
    assert re.fullmatch(r"[0-9a-f]{40}", params["git_commit"])
    assert (params["torch_version"], params["device"], params["world_size"]) == (torch.__version__, "cpu", "1")
    # the champion's score has its own budget (the smoke preset's evaluation.num_samples), apart from the grids
    assert params["eval.num_samples"] == "200" and params["eval.extractor_id"].startswith("lenet-")
    assert params["eval.primary"] == "ddim5-eta0-linear"
    ddim, ddpm = (load_file(client.download_artifacts(run_id, f"samples/{tag}.safetensors"))["images"]
                  for tag in ("ddim5", "ddpm20"))
    assert (len(ddim), len(ddpm)) == (200, 32)
    # headline keys: the primary scores under names every run shares, beside the per-sampler keys
    metrics = run.data.metrics
    for key, name in (("fid", "fid"), ("fid_std", "fid_std"), ("kid", "kid"), ("kid_std", "kid_std"),
                      ("precision", "precision"), ("recall", "recall"), ("confident", "confident_fraction"),
                      ("class_entropy", "class_entropy")):
        assert metrics[key] == metrics[f"{name}_lenet_ddim5"], key
    assert metrics["fid_std"] > 0 and "fid_std_lenet_ddpm20" not in metrics  # bootstrapped for the primary only
    tags = run.data.tags  # what MLflow's UI shows as Source, Version and User
    assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == ("flows/train_eval.py", "LOCAL")
    assert tags["mlflow.source.git.commit"] == params["git_commit"] and tags["mlflow.user"]
    assert SECRET not in json.dumps([params, run.data.tags])

    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [5, 10]
    for key in ("lr", "images_per_s", "fid_lenet_ddim5", "fid_lenet_ddpm20", "kid_lenet_ddim5",
                "sampling_images_per_s_ddim5", "sampling_images_per_s_ddpm20"):
        assert key in run.data.metrics, key
    assert _artifact_paths(client, run_id) == {
        "config.json", "forward_process.png", "loss_curve.png", "metrics.jsonl", "evaluation.json",
        "checkpoints/last.safetensors", "model/MLmodel", "model/config.json", "model/model.safetensors",
        "model/conda.yaml", "model/python_env.yaml", "model/requirements.txt", "model/input_example.json",
        "model/serving_input_example.json",
        "samples/ddim5.png", "samples/ddim5.safetensors", "samples/ddpm20.png", "samples/ddpm20.safetensors"}
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "mnist" and sha256.startswith(dataset_input.dataset.digest)
    assert json.loads(dataset_input.dataset.profile)["sha256"] == sha256

    version = run.data.tags["model_version"]
    aliases = client.get_registered_model("ddpm-mnist").aliases
    assert {alias: str(v) for alias, v in aliases.items()} == {CHALLENGER: version, CHAMPION: version}
    tags = client.get_model_version("ddpm-mnist", version).tags
    assert tags["eval.sampler"] == "ddim5-eta0-linear" and tags["champion.decision"] == "promoted"
    assert (float(tags["eval.fid"]), float(tags["eval.fid_std"])) == (metrics["fid"], metrics["fid_std"])
    assert tags["eval.num_samples"] == "200" and tags["champion.rule"].startswith("promote if")
    assert run.data.tags["champion.decision"] == "promoted"

    model = load_registered_model("models:/ddpm-mnist@champion")
    (images,) = generate_batches(model.denoiser, model.denoiser.schedule, (1, 28, 28),
                                 SampleConfig(steps=2, num_samples=2, batch_size=2), device="cpu", progress=False)
    assert images.shape == (2, 1, 28, 28) and images.dtype == torch.uint8


@pytest.fixture()
def smoke_model(pipeline) -> str:
    """`ddpm-mnist` with its gate and a champion: the first flow test's, else (a test run alone or first)
    one smoke train-eval run's. Returns the model's name."""
    client = MlflowClient()
    if not client.search_registered_models(filter_string="name='ddpm-mnist'"):
        train_eval(preset="smoke", overrides=FAST, num_samples=32)
    return "ddpm-mnist"


def test_a_run_cannot_change_its_judge_and_the_gate_changes_only_by_command_with_history(smoke_model):
    """The protocol and the rule belong to the registered model: a run that asks for another budget, no
    bootstrap or another rule is refused before any work; the maintenance command writes a new revision
    (who, when, why), keeping the old; a gate tag edited by hand is refused."""
    client = MlflowClient()
    gate = read_gate(client, "ddpm-mnist")  # made by the first run from its protocol, with the project's rule
    assert (gate.revision, gate.rule, gate.protocol["evaluation.num_samples"]) == (1, DEFAULT_RULE, 200)
    assert gate.by.startswith("train-eval run ")
    experiment = client.get_experiment_by_name("diffusion-mnist").experiment_id
    runs_before = len(client.search_runs([experiment]))
    for lower_the_bar, refused in (({"evaluation.bootstrap": 0}, "evaluation.bootstrap"),
                                   ({"evaluation": {"num_samples": 10}}, "evaluation.num_samples"),
                                   ({"sample.steps": 2}, "sample.steps")):
        with pytest.raises(ConfigError, match=rf"parameter {refused.replace('.', '[.]')} refused: .*its gate"):
            train_eval(preset="smoke", overrides={**FAST, **lower_the_bar})
    for rule_key in ("evaluation.promotion_sigmas", "evaluation.min_improvement"):
        with pytest.raises(ConfigError, match="no longer a config setting: it belongs to the registered model's gate"):
            train_eval(preset="smoke", overrides={**FAST, rule_key: 0.0})
    with pytest.raises(ConfigError, match="extractor refused"):
        train_eval(preset="smoke", overrides=FAST, extractor="inception")
    assert len(client.search_runs([experiment])) == runs_before  # all refused before any work

    with pytest.raises(ConfigError, match="continuation='sometimes' is unknown; choose one of better, not-worse"):
        change_gate(client, "ddpm-mnist", "a typo", continuation="sometimes")
    changed = change_gate(client, "ddpm-mnist", "stricter rule", sigmas=3.0, min_improvement=0.5, by="maintainer",
                          continuation="better")
    assert (changed.revision, changed.by, changed.reason, changed.rule) == (2, "maintainer", "stricter rule",
                                                                            PromotionRule(3.0, 0.5))
    assert [(g.revision, g.rule) for g in history(client, "ddpm-mnist")] == [(1, DEFAULT_RULE), (2, PromotionRule(3.0, 0.5))]
    client.set_registered_model_tag("ddpm-mnist", GATE_TAG, gate.to_json())  # back to revision 1, by hand
    with pytest.raises(ConfigError, match="edited outside python -m flows.gate"):
        train_eval(preset="smoke", overrides=FAST)
    change_gate(client, "ddpm-mnist", "restore the default rule", sigmas=DEFAULT_RULE.sigmas,
                min_improvement=DEFAULT_RULE.min_improvement, by="maintainer", continuation=DEFAULT_RULE.continuation)
    assert (read_gate(client, "ddpm-mnist").revision, read_gate(client, "ddpm-mnist").rule) == (3, DEFAULT_RULE)


def test_rescore_takes_the_champion_to_the_gates_new_protocol_as_a_recorded_step(pipeline):
    """After the gate's protocol changes (here the evaluation budget) a run's score is not comparable with
    the champion's; re-scoring the champion under the gate is the recorded step after which the next run is
    compared again. Every earlier score stays on the version."""
    client = MlflowClient()
    champion = str(client.get_registered_model("ddpm-mnist").aliases[CHAMPION])
    before = client.get_model_version("ddpm-mnist", champion).tags
    change_gate(client, "ddpm-mnist", "smaller budget", {"evaluation.num_samples": 100}, by="maintainer")
    not_comparable = client.get_run(train_eval(preset="smoke", overrides=FAST, num_samples=16))
    assert "scored differently (num_samples)" in not_comparable.data.tags["champion.reason"]
    assert not_comparable.data.params["eval.num_samples"] == "100"  # scored under the gate, not the preset

    run_id = rescore(model="ddpm-mnist")
    run = client.get_run(run_id)
    tags = client.get_model_version("ddpm-mnist", champion).tags
    assert (tags["eval.num_samples"], tags["eval.rescored_by"], run.data.tags["rescore.of"]) == (
        "100", run_id, f"ddpm-mnist/{champion}")
    assert json.loads(tags["eval.history.0001"])["eval.fid"] == before["eval.fid"] and before["eval.num_samples"] == "200"
    assert float(tags["eval.fid"]) == run.data.metrics["fid"] and run.info.status == "FINISHED"
    samples = {p for p in _artifact_paths(client, run_id) if p.startswith("samples/")}
    assert samples == {"samples/ddim5.safetensors", "samples/ddim5.png"}  # the primary setting only
    assert len(load_file(client.download_artifacts(run_id, "samples/ddim5.safetensors"))["images"]) == 100
    assert run.data.params["data.source"] == os.environ["DIFFUSION_DATA_SOURCE"]  # the worker's data, not a record's

    # lenet-mnist is the gate's lenet by another name: accepted, scored under the headline keys
    next_run = client.get_run(train_eval(preset="smoke", overrides=FAST, num_samples=16, extractor="lenet-mnist"))
    assert next_run.data.tags["champion.previous_version"] == champion
    assert "scored differently" not in next_run.data.tags["champion.reason"] and "fid" in next_run.data.metrics
    rescore(model="ddpm-mnist")
    assert "eval.history.0002" in client.get_model_version("ddpm-mnist", champion).tags  # full history, not one level


def test_the_config_in_mlflow_is_a_record_never_an_input(pipeline, tmp_path):
    """Whoever can write to the tracking server rewrites a running run's config.json (other data, other
    sample counts): the run goes on with the config it was submitted with."""
    import threading

    client = MlflowClient()
    experiment = client.get_experiment_by_name("diffusion-mnist").experiment_id
    known = {r.info.run_id for r in client.search_runs([experiment])}
    result: dict = {}
    flow_thread = threading.Thread(target=lambda: result.update(
        run_id=train_eval(preset="smoke", overrides={**FAST, "train.steps": 40}, num_samples=16)))
    flow_thread.start()
    tampered = load_config("smoke", {**FAST, "sample.num_samples": 5, "evaluation.num_samples": 11,
                                     "data.source": str(tmp_path / "elsewhere"), "data.data_dir": str(tmp_path)})
    deadline = time.monotonic() + 300
    while True:
        new = [r for r in client.search_runs([experiment]) if r.info.run_id not in known]
        if new and "config.json" in {a.path for a in client.list_artifacts(new[0].info.run_id)}:
            break
        assert flow_thread.is_alive() and time.monotonic() < deadline, "the run never logged its config"
        time.sleep(0.2)
    (run,) = new
    client.log_artifact(run.info.run_id, str(write_resolved_config(tampered, tmp_path)))
    flow_thread.join(timeout=600)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    stored = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path / "dl"))).read_text())
    assert stored["evaluation"]["num_samples"] == 11  # the record was rewritten …
    params = run.data.params
    assert config_sha256(load_config(str(tmp_path / "dl" / "config.json"))) != params["config_sha256"]
    primary, ddpm = (load_file(client.download_artifacts(run.info.run_id, f"samples/{tag}.safetensors"))["images"]
                     for tag in ("ddim5", "ddpm20"))
    assert (len(primary), len(ddpm)) == (int(params["evaluation.num_samples"]), 16)  # … and ignored
    assert not any((tmp_path / name).exists() for name in ("elsewhere", "mnist.safetensors"))


def test_class_conditional_model_is_swept_evaluated_and_registered_apart(pipeline, mnist_raw_source, data_dir):
    overrides = {**FAST, "model.num_classes": 10, "sample.guidance": 2.0, "sample.guidance_sweep": [0.0, 2.0],
                 "sample.nfe_sweep": [2], "evaluation.num_samples": 230}
    # 230 images in the test split's class mix hold at least 20 of every digit (5: 8.92 %): per-class FIDs
    run_id = train_eval(preset="smoke", overrides=overrides, num_samples=230)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for tag in ("ddim5_w2", "ddim5_w0", "ddpm20_w2", "ddim2_w2", "dpmpp2m2_w2", "dpmpp2msde2_w2"):  # config, sweeps, DDPM
        assert 0 <= metrics[f"class_consistency_lenet_{tag}"] <= 1 and f"fid_lenet_{tag}" in metrics, tag
    assert "fid_lenet_ddim5_w2_class7" in metrics and "fid_lenet_ddim5_w2_classmean" in metrics
    artifacts = _artifact_paths(client, run_id)
    assert {"guidance_sweep.png", "fid_vs_nfe.png", "samples/ddim5_w0.safetensors", "samples/ddim5_w2.png"} <= artifacts
    samples = load_file(client.download_artifacts(run_id, "samples/ddim5_w2.safetensors"))
    # labels in the test split's class mix (FID's reference): each count within one of its share of 230
    _, split_labels = prepare_dataset("mnist", str(mnist_raw_source), data_dir).load("test")
    shares = torch.bincount(split_labels, minlength=10) * 230 / len(split_labels)
    counts = torch.bincount(samples["labels"], minlength=10)
    assert counts.sum() == 230 and bool(((counts - shares).abs() < 1).all()), (counts, shares)

    version = run.data.tags["model_version"]
    tags = client.get_model_version("ddpm-mnist-cond", version).tags  # its own registered model and champion
    assert (tags["num_classes"], tags["guidance"], tags["label_dropout"]) == ("10", "2.0", "0.1")
    assert tags["eval.sampler"] == "ddim5_w2-eta0-linear-testmix" and tags["champion.decision"] == "promoted"
    model = load_registered_model("models:/ddpm-mnist-cond@champion")
    assert model.config.conditional


@pytest.fixture()
def s3_store(tmp_path, monkeypatch):
    """A real S3 endpoint on 127.0.0.1 (the stack's store) holding this test's MLflow artifacts, with its
    own tracking database; `.stop()` takes the endpoint down."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(REPO / "infra" / "s3_server.py"), "--port", str(port),
                               "--state-dir", str(tmp_path / "s3"), "--bucket", "outage"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "the S3 server did not start"
            time.sleep(0.3)
    for key, value in {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'outage.db'}",
                       "DIFFUSION_ARTIFACT_LOCATION": "s3://outage/mlflow",
                       "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "outage-key",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    server.stop = lambda: (server.terminate(), server.wait(timeout=30))
    yield server
    if server.poll() is None:
        server.stop()


def test_s3_outage_at_upload_fails_cleanly_and_registers_nothing(pipeline, s3_store, monkeypatch):
    cheap = {**FAST, "train.steps": 4, "train.log_every": 2, "train.checkpoint_every": 4}
    first = train_eval(preset="smoke", overrides=cheap, num_samples=16)  # S3 up: version 1 becomes champion
    client = MlflowClient()
    assert client.get_registered_model("ddpm-mnist").aliases == {CHALLENGER: 1, CHAMPION: 1}

    import flows.register

    real_upload = flows.register.upload_artifacts

    def upload_during_outage(*args, **kwargs):  # S3 goes down after training, as the model upload starts
        s3_store.stop()
        return real_upload(*args, **kwargs)

    monkeypatch.setattr(flows.register, "upload_artifacts", upload_during_outage)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"upload of model to the artifact store .* failed after 4 attempts"):
        train_eval(preset="smoke", overrides=cheap, num_samples=16)
    assert time.monotonic() - start < 300  # bounded retries, no hang
    (failed,) = [r for r in client.search_runs([client.get_run(first).info.experiment_id]) if r.info.run_id != first]
    assert failed.info.status == "FAILED"
    assert [str(v.version) for v in client.search_model_versions("name='ddpm-mnist'")] == ["1"]  # nothing registered
    assert client.get_registered_model("ddpm-mnist").aliases == {CHALLENGER: 1, CHAMPION: 1}


def test_a_run_may_not_point_the_worker_at_other_data(pipeline, tmp_path):
    """Flow parameters arrive from whoever reaches the Prefect API: a data path is refused before any
    work (no MLflow run, nothing read from it), naming the key."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name("diffusion-mnist")
    before = len(client.search_runs([experiment.experiment_id])) if experiment else 0
    with pytest.raises(ConfigError, match=r"overrides\['data.data_dir'\] refused"):
        train_eval(preset="smoke", overrides={**FAST, "data.data_dir": str(tmp_path)})
    experiment = client.get_experiment_by_name("diffusion-mnist")
    assert (len(client.search_runs([experiment.experiment_id])) if experiment else 0) == before
    assert not any(tmp_path.iterdir())


def test_failed_training_fails_the_flow_with_the_log_tail(pipeline, tmp_path, monkeypatch):
    # a valid config from the worker's own preset folder, but the training process refuses it: a batch larger
    # than the training set (no deployment parameter may ask for such a batch)
    (tmp_path / "huge-batch.toml").write_text('extends = "smoke"\n[train]\nbatch_size = 70000\n')
    monkeypatch.setenv(PRESET_DIR_ENV, str(tmp_path))
    with pytest.raises(TrainingFailed, match="exceeds the 60000 training examples"):
        train_eval(preset="huge-batch.toml", overrides=FAST)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("diffusion-mnist")
    (latest,) = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    assert latest.info.status == "FAILED" and latest.data.params["train.batch_size"] == "70000"


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # exited meanwhile
            pass
    return found


def test_terminating_the_train_flow_ends_every_training_process(pipeline, tmp_path):
    """A cancelled flow run gets SIGTERM from its runner: the torchrun group must go with it."""
    from prefect.settings import PREFECT_API_URL

    client = MlflowClient()
    run_id = client.create_run(ensure_experiment(client, "mnist")).info.run_id
    config = load_config("smoke", {"train.steps": 100_000})
    client.log_artifact(run_id, str(write_resolved_config(config, tmp_path)))
    work = tmp_path / "work"
    flow_process = subprocess.Popen(
        [sys.executable, "-c", "from flows.train import train_model; from diffusion_core import load_config; "
         f"train_model({run_id!r}, {str(work)!r}, load_config({str(tmp_path / 'config.json')!r}).to_dict())"],
        cwd=REPO, env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
    try:
        deadline = time.monotonic() + 180
        while not (work / "forward_process.png").is_file():  # rank 0 is training
            assert flow_process.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(1)
        assert _processes_mentioning(str(work))
        flow_process.send_signal(signal.SIGTERM)
        flow_process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _processes_mentioning(str(work)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _processes_mentioning(str(work))
    finally:
        flow_process.kill()
        for pid in _processes_mentioning(str(work)):
            os.kill(pid, signal.SIGKILL)


def test_champion_moves_only_when_better_beyond_the_noise_and_measured_the_same_way(pipeline, tmp_path):
    """The rule: promote when champion FID − candidate FID > max(k·√(σ_c² + σ_p²), minimum improvement),
    strictly, and never across protocols. Each case sits on one side of that line by construction."""
    client = MlflowClient()
    name = "ddpm-champion-test"
    client.create_registered_model(name)
    protocol = {"extractor_id": "lenet-mnist-abc", "num_samples": "1000", "sampler": "ddim50-eta0-linear",
                "dataset_sha256": "f" * 64}

    def new_version(fid: float, std: float = 0.3, rule: PromotionRule = PromotionRule(2.0, 0.0), **changes: str):
        version = str(client.create_model_version(name, source=str(tmp_path)).version)
        return select_champion(client, name, version, Score(fid, {**protocol, **changes}, std), rule), version

    def champion() -> str:
        return str(client.get_registered_model(name).aliases[CHAMPION])

    first, v1 = new_version(10.0)
    assert first.promoted and first.reason == "no champion yet"
    worse, _ = new_version(12.0)
    assert not worse.promoted and (worse.candidate_fid, worse.champion_fid, worse.champion_version) == (12.0, 10.0, v1)
    within_noise, _ = new_version(9.2)  # gain 0.8 < 2·√(0.3² + 0.3²) = 0.85
    assert not within_noise.promoted and "within the margin 0.849" in within_noise.reason and champion() == v1
    other_protocol, _ = new_version(1.0, num_samples="500")
    assert not other_protocol.promoted and "num_samples" in other_protocol.reason and "rescore" in other_protocol.reason
    nan, _ = new_version(float("nan"))
    assert not nan.promoted
    better, v6 = new_version(9.1)  # gain 0.9 > 0.85
    assert better.promoted and champion() == v6 and str(client.get_registered_model(name).aliases[PREVIOUS]) == v1
    tags = client.get_model_version(name, v6).tags
    assert (tags["champion.decision"], tags["champion.previous_version"], tags["champion.previous_fid"],
            tags["champion.previous_fid_std"], tags["champion.candidate_fid_std"]) == ("promoted", v1, "10.0", "0.3", "0.3")
    assert (tags["eval.fid"], tags["eval.fid_std"]) == ("9.1", "0.3") and "σ_gap" in tags["champion.rule"]
    assert (tags["champion.gap_std"], float(tags["champion.margin"])) == ("none", pytest.approx(2 * 0.3 * 2**0.5))

    at_minimum, _ = new_version(8.1, 0.0, PromotionRule(0.0, 1.0))  # exactly the minimum improvement: kept
    assert not at_minimum.promoted and champion() == v6
    past_minimum, v8 = new_version(8.0, 0.0, PromotionRule(0.0, 1.0))
    assert past_minimum.promoted and champion() == v8 and str(client.get_registered_model(name).aliases[PREVIOUS]) == v6

    with pytest.raises(ConfigError, match="say why"):
        rollback(client, name, " ")
    assert rollback(client, name, "v8 draws smudges", by="tester") == (v6, v8)  # one command back
    aliases = client.get_registered_model(name).aliases
    assert (str(aliases[CHAMPION]), str(aliases[PREVIOUS])) == (v6, v8)
    record = json.loads(client.get_model_version(name, v8).tags["rollback.0001"])
    assert (record["from"], record["to"], record["by"], record["reason"]) == (v8, v6, "tester", "v8 draws smudges")
    assert json.loads(client.get_model_version(name, v6).tags["rollback.0001"]) == record
    assert rollback(client, name, "undo") == (v8, v6)  # the same command undoes it


def test_a_continuation_of_the_champions_line_is_promoted_unless_worse_than_its_lines_best(pipeline, tmp_path):
    """Under continuation="not-worse" a version whose lineage.parent chain reaches the champion is promoted
    when its FID − the lowest comparable FID of its line ≤ the margin against that version (2·√(σ² + σ²):
    0.632 against v1's σ 0.1, 0.849 between two σ 0.3); a version outside the line, one whose line passes
    through a version the champion was rolled back from, and every version under "better" must gain more
    than the margin. The training head never is a continuation the gate found worse. A gate recorded
    before the setting existed reads as "better"."""
    from flows.gate import Gate
    from flows.nightly import training_head

    client = MlflowClient()
    name = "ddpm-continuation-test"
    client.create_registered_model(name)
    protocol = {"extractor_id": "lenet-mnist-abc", "num_samples": "1000", "sampler": "ddim50-eta0-linear",
                "dataset_sha256": "f" * 64}
    not_worse = PromotionRule(2.0, 0.0, continuation="not-worse")
    asked = []

    def gap_spread(reference: Score, candidate: Score) -> None:
        asked.append((reference.fid, reference.fid_std))
        return None  # unpaired margins

    def new_version(fid: float, parent: str, std: float = 0.3, rule: PromotionRule = not_worse, **changes: str):
        version = str(client.create_model_version(name, source=str(tmp_path), tags={"lineage.parent": parent}).version)
        return select_champion(client, name, version, Score(fid, {**protocol, **changes}, std), rule, gap_spread), version

    def champion() -> str:
        return str(client.get_registered_model(name).aliases[CHAMPION])

    _, v1 = new_version(10.0, "none", std=0.1)
    worse_inside, v2 = new_version(10.5, v1)  # 0.5 worse than the champion, its line's best: inside 0.632
    assert worse_inside.promoted and champion() == v2 and str(client.get_registered_model(name).aliases[PREVIOUS]) == v1
    assert "continues champion v1's line" in worse_inside.reason and "change +0.5, not worse beyond the margin 0.632" \
        in worse_inside.reason, worse_inside.reason
    tags = client.get_model_version(name, v2).tags
    assert (tags["champion.basis"], tags["champion.compared_version"], tags["champion.previous_version"]) == (
        "continuation", v1, v1)
    fresh, _ = new_version(10.0, "none")  # not of the line: 0.5 better is inside the noise
    assert not fresh.promoted and fresh.basis == "improvement" and "gain 0.5 within the margin 0.849" in fresh.reason
    creeping, v4 = new_version(10.7, v2)  # 0.2 worse than champion v2, 0.7 worse than v1, the line's best
    assert not creeping.promoted and champion() == v2 and creeping.compared_version == v1, creeping.reason
    assert "vs v1's (the best of champion v2's line) 10 ± 0.1" in creeping.reason and asked[-1] == (10.0, 0.1)
    assert training_head(client, name, v2, not_worse) == v2  # the gate found v4 worse: no night continues it
    _, v5 = new_version(10.6, v2)  # 0.6 worse than the line's best: inside
    assert champion() == v5
    sibling, _ = new_version(10.0, v1)  # continues v1, an ancestor of the champion, not the champion's line
    assert not sibling.promoted and sibling.basis == "improvement"
    _, v7 = new_version(11.5, v5)  # found worse, kept ...
    through_kept, v8 = new_version(10.5, v7)  # ... and a night continuing it still descends from champion v5
    assert through_kept.promoted and through_kept.basis == "continuation" and champion() == v8
    _, v9 = new_version(10.5, v8)
    assert champion() == v9 and rollback(client, name, "v9 draws smudges") == (v8, v9)
    late, _ = new_version(10.45, v9)  # a night that started from v9 before the rollback: v9's line is withdrawn
    assert not late.promoted and late.basis == "improvement" and champion() == v8, late.reason
    assert training_head(client, name, v8, not_worse) == v8  # neither v9 nor what continued it
    other_protocol, v12 = new_version(1.0, v8, num_samples="500")
    assert not other_protocol.promoted and "scored differently" in other_protocol.reason
    _, v13 = new_version(10.55, v12)  # v12 is in its line but scored another way: the line's best is still v1
    assert champion() == v13
    nan, _ = new_version(float("nan"), v13)
    assert not nan.promoted and champion() == v13
    judged_as_better, _ = new_version(10.5, v13, rule=PromotionRule(2.0, 0.0))  # rule "better": gain 0.05, kept
    assert not judged_as_better.promoted and judged_as_better.basis == "improvement" and champion() == v13

    old = json.dumps({"rule": {"sigmas": 2.0, "min_improvement": 0.0}, "protocol": {}, "revision": 1, "by": "x",
                      "at": "2026-01-01T00:00:00+00:00", "reason": "recorded before continuation existed"})
    assert Gate.from_json(old).rule == PromotionRule(2.0, 0.0, continuation="better")


def test_the_margin_is_the_paired_gap_spread_when_measured_else_the_unpaired_one(pipeline, tmp_path):
    """With σ_gap measured, the margin is max(k·σ_gap, minimum): a gain of 0.5 clears 2·0.2 but not the
    unpaired 2·√(0.3² + 0.3²) = 0.85. The spread is asked with the champion's and the candidate's scores,
    each naming the run that holds its samples (a champion scored before runs were recorded: the run that
    registered it). A spread that cannot be measured (None) falls back to the unpaired margin."""
    client = MlflowClient()
    name = "ddpm-paired-gate-test"
    client.create_registered_model(name)
    experiment = client.create_experiment("paired-gate-test")
    protocol = {"extractor_id": "lenet-mnist-abc", "num_samples": "1000", "sampler": "ddim50-eta0-linear",
                "dataset_sha256": "f" * 64}
    asked = []

    def new_version(fid: float, spread: float | None, record_run: bool = True):
        run_id = client.create_run(experiment).info.run_id
        version = str(client.create_model_version(name, source=str(tmp_path), run_id=run_id).version)

        def gap_spread(champion: Score, candidate: Score) -> float | None:
            asked.append((champion.run_id, candidate.run_id))
            return spread

        score = Score(fid, protocol, 0.3, run_id if record_run else None)
        return select_champion(client, name, version, score, PromotionRule(2.0, 0.0), gap_spread), run_id

    first, run1 = new_version(10.0, 0.2, record_run=False)  # registered by run1; its score names no run
    assert first.promoted and asked == []
    paired, run2 = new_version(9.5, 0.2)
    assert paired.promoted and asked == [(run1, run2)], asked
    assert "gain 0.5 beyond the margin 0.4 (paired σ_gap 0.2)" in paired.reason, paired.reason
    tags = client.get_model_version(name, "2").tags
    assert (tags["champion.gap_std"], tags["champion.margin"], tags["eval.run_id"]) == ("0.2", "0.4", run2)
    unmeasured, run3 = new_version(9.0, None)
    assert not unmeasured.promoted and asked[-1] == (run2, run3)
    assert "within the margin 0.849 (unpaired" in unmeasured.reason, unmeasured.reason


def test_rollback_without_a_previous_champion_is_refused(pipeline, tmp_path):
    client = MlflowClient()
    name = "ddpm-rollback-test"
    client.create_registered_model(name)
    version = str(client.create_model_version(name, source=str(tmp_path)).version)
    client.set_registered_model_alias(name, CHAMPION, version)
    with pytest.raises(ConfigError, match="no 'champion' and 'previous' aliases to swap.*has: champion"):
        rollback(client, name, "bad night")
    assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {CHAMPION: version}


@pytest.mark.parametrize("slow", ["worse", "better"])
def test_two_decisions_at_once_leave_the_better_model_champion(pipeline, tmp_path, monkeypatch, slow):
    """Two runs decide at the same moment, one of them slow between reading the champion and moving it.
    Without the lock, when the worse one is slow both compare against the old champion and the worse
    one moves the alias last; with it, the second decision sees the first one's result. Either order
    ends with the better model as champion."""
    import threading

    import flows.registry as registry

    client = MlflowClient()
    name = f"ddpm-race-{slow}"
    client.create_registered_model(name)
    protocol = {"extractor_id": "lenet-mnist-abc", "num_samples": "1000", "sampler": "ddim50-eta0-linear",
                "dataset_sha256": "f" * 64}
    versions = {who: str(client.create_model_version(name, source=str(tmp_path)).version)
                for who in ("old", "worse", "better")}
    select_champion(client, name, versions["old"], Score(10.0, protocol, 0.1), DEFAULT_RULE)
    fids = {"worse": 8.0, "better": 5.0}

    real_read = registry.current_champion

    def read_then_stall(*args):
        found = real_read(*args)
        if threading.current_thread().name == slow:
            time.sleep(4)
        return found

    monkeypatch.setattr(registry, "current_champion", read_then_stall)
    errors = []

    def decide(who: str) -> None:
        try:
            select_champion(MlflowClient(), name, versions[who], Score(fids[who], protocol, 0.1), DEFAULT_RULE)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = {who: threading.Thread(target=decide, args=(who,), name=who) for who in fids}
    threads[slow].start()
    time.sleep(1.5)  # the slow one has read the champion and stalls
    threads["better" if slow == "worse" else "worse"].start()
    for thread in threads.values():
        thread.join(timeout=120)
    assert not errors
    assert str(client.get_registered_model(name).aliases[CHAMPION]) == versions["better"]
    # the lock's own evidence: the second decision compared against the first one's result, not the old champion
    second = "better" if slow == "worse" else "worse"
    assert client.get_model_version(name, versions[second]).tags["champion.previous_version"] == versions[slow]


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_two_candidates_closer_than_the_margin_the_first_to_clear_it_wins(pipeline, tmp_path, order):
    """What the rule promises for several candidates: champion C (10.0); A (8.0, the best) and B (8.5) both
    clear the margin (2·√(0.3² + 0.3²) = 0.849) over C, but are within it of each other. Whichever decides
    first is promoted and the other is then kept: the order decides, and the champion ends within one
    margin of the best candidate, never worse than C."""
    client = MlflowClient()
    name = f"ddpm-order-{''.join(order)}"
    client.create_registered_model(name)
    protocol = {"extractor_id": "lenet-mnist-abc", "num_samples": "1000", "sampler": "ddim50-eta0-linear",
                "dataset_sha256": "f" * 64}
    fids = {"c": 10.0, "a": 8.0, "b": 8.5}
    versions = {}
    for who in ("c", *order):
        versions[who] = str(client.create_model_version(name, source=str(tmp_path)).version)
        select_champion(client, name, versions[who], Score(fids[who], protocol, 0.3), DEFAULT_RULE)
    champion = str(client.get_registered_model(name).aliases[CHAMPION])
    assert champion == versions[order[0]]
    margin = DEFAULT_RULE.margin(Score(fids["a"], protocol, 0.3), Score(fids["b"], protocol, 0.3))
    assert fids[order[0]] - min(fids.values()) <= margin < fids["c"] - fids[order[0]]


def test_a_failed_lease_renewal_does_not_cut_a_decision_in_half(pipeline, tmp_path, monkeypatch):
    """The lock's lease is renewed in the background. If renewals fail (the Prefect API unreachable) while
    a decision is being written, the decision still completes: tags and alias, never one without the other."""
    import httpx
    import prefect.concurrency._leases as leases
    from prefect.client.orchestration import SyncPrefectClient

    import flows.registry as registry

    monkeypatch.setattr(leases, "_RENEWAL_FRACTION", 0.005)  # renew every 1.5 s of the 300 s lease
    monkeypatch.setattr(leases, "_RENEWAL_RETRY_BASE_DELAY", 0.1)
    client = MlflowClient()
    name = "ddpm-lease"
    client.create_registered_model(name)
    protocol = {"extractor_id": "lenet-mnist-abc", "num_samples": "1000", "sampler": "ddim50-eta0-linear",
                "dataset_sha256": "f" * 64}
    old, new = (str(client.create_model_version(name, source=str(tmp_path)).version) for _ in range(2))
    select_champion(client, name, old, Score(10.0, protocol, 0.1), DEFAULT_RULE)
    real_read = registry.current_champion

    def unreachable(*args, **kwargs):
        raise httpx.ConnectError("Prefect API unreachable")

    def read_then_lose_the_api(*args):
        found = real_read(*args)
        monkeypatch.setattr(SyncPrefectClient, "renew_concurrency_lease", unreachable)
        time.sleep(8)  # several renewals fail, with their retries, while the decision holds the lock
        return found

    monkeypatch.setattr(registry, "current_champion", read_then_lose_the_api)
    decision = select_champion(client, name, new, Score(5.0, protocol, 0.1), DEFAULT_RULE)
    assert decision.promoted and str(client.get_registered_model(name).aliases[CHAMPION]) == new
    assert client.get_model_version(name, new).tags["champion.decision"] == "promoted"


def test_prefect_shows_each_runs_result_and_decision_as_keyed_artifacts(pipeline):
    """Read back through Prefect's API: the train-eval flow run holds a markdown summary (`train-eval-<model>`)
    and a score table (`scores-<model>`) whose FID, σ, N, decision, reason and links are the MLflow run's."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    client = MlflowClient()
    run = client.get_run(train_eval(preset="smoke", overrides=FAST, num_samples=16))
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    flow_run_id, version = tags["prefect.flow_run_id"], tags["model_version"]
    with get_client(sync_client=True) as prefect:
        def artifacts(key: str) -> list:
            return prefect.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

        (summary,), (table,) = artifacts("train-eval-ddpm-mnist"), artifacts("scores-ddpm-mnist")
        latest = prefect.read_latest_artifacts()
    assert (summary.type, table.type) == ("markdown", "table")
    assert {a.key: a.latest_id for a in latest if a.key in ("train-eval-ddpm-mnist", "scores-ddpm-mnist")} == {
        "train-eval-ddpm-mnist": summary.id, "scores-ddpm-mnist": table.id}  # the newest of each key's history
    text = summary.data
    decision = tags["champion.decision"]
    assert text.startswith(f"## ddpm-mnist v{version}: {decision}\n")
    assert f"**Decision: {decision}.** {tags['champion.reason']}\n" in text
    assert f"Rule (the model's gate): {tags['champion.rule']}\n" in text
    this_run = re.search(r"^\| this run: v(\d+) \| (\S+) \| (\S+) \| (\d+) \| (\S+) \| (\S+) \|$", text, re.M)
    assert this_run.group(1) == version and this_run.group(4) == params["eval.num_samples"]
    assert float(this_run.group(2)) == pytest.approx(metrics["fid"], rel=5e-4)  # shown to 4 significant digits
    assert float(this_run.group(3)) == pytest.approx(metrics["fid_std"], rel=5e-2)  # σ to 2
    assert (this_run.group(5), this_run.group(6)) == (params["eval.primary"], params["eval.extractor_id"])
    previous = tags["champion.previous_version"]
    if previous == "none":
        assert "| champion before: none | – |" in text
    else:
        before = re.search(rf"^\| champion before: v{previous} \| (\S+) \| (\S+) \|", text, re.M)
        assert float(before.group(1)) == pytest.approx(float(tags["champion.previous_fid"]), rel=5e-4)
        assert float(before.group(2)) == pytest.approx(float(tags["champion.previous_fid_std"]), rel=5e-2)
    grid = f"{run.info.artifact_uri}/samples/ddim5.png"
    assert (f"- MLflow run: `{run.info.run_id}`\n- Model version: `models:/ddpm-mnist/{version}`\n"
            f"- Sample grid (samples/ddim5.png): `{grid}`") in text  # a SQLite store: ids and URIs, no UI links
    assert "samples/ddim5.png" in _artifact_paths(client, run.info.run_id)

    rows = json.loads(table.data)  # a table artifact's data is its rows as JSON
    by_setting = {row["setting"]: row for row in rows}
    assert set(by_setting) == {"ddim5", "ddpm20"}
    primary, ddpm = by_setting["ddim5"], by_setting["ddpm20"]
    assert (primary["primary"], primary["N"], primary["protocol"]) == ("yes", int(params["eval.num_samples"]),
                                                                     params["eval.primary"])
    assert (ddpm["primary"], ddpm["N"], ddpm["protocol"]) == ("no", 16, "ddpm20-linear")
    for row in rows:
        for metric in ("fid", "kid", "precision", "recall"):
            assert row[metric] == pytest.approx(metrics[f"{metric}_lenet_{row['setting']}"], rel=5e-4), metric
    assert primary["fid_std"] == pytest.approx(metrics["fid_std"], rel=5e-4) and ddpm["fid_std"] is None


def test_a_night_continues_the_newest_version_of_the_champions_line_the_gate_did_not_find_worse(pipeline, tmp_path):
    """The training head: versions descending from the champion whose FID is not worse than the champion's
    beyond the margin (2·√(σ² + σ²) = 0.85 here) carry the line on; a worse one, another protocol, or a fresh
    version outside the line does not."""
    from flows.nightly import training_head

    client = MlflowClient()
    name = "ddpm-head-test"
    client.create_registered_model(name)
    protocol = {"extractor_id": "lenet-mnist-abc", "num_samples": "1000", "sampler": "ddim50-eta0-linear",
                "dataset_sha256": "f" * 64}
    rule = PromotionRule(2.0, 0.0)

    def version(fid: float, parent: str, decision: dict[str, str] | None = None, **changes: str) -> str:
        tags = {**Score(fid, {**protocol, **changes}, 0.3).tags(), "lineage.parent": parent, **(decision or {})}
        return str(client.create_model_version(name, source=str(tmp_path), tags=tags).version)

    v1 = version(10.0, "none")
    assert training_head(client, name, v1, rule) == v1
    v2 = version(9.5, v1)  # better, but inside the noise: kept, and the line goes on from it
    assert training_head(client, name, v1, rule) == v2
    version(10.9, v2)  # worse than the champion by 0.9 > 0.85
    version(5.0, "none")  # a fresh version: not of this line
    version(9.0, v2, num_samples="500")  # scored another way
    assert training_head(client, name, v1, rule) == v2
    v6 = version(10.8, v2)  # worse by 0.8, inside the margin
    assert training_head(client, name, v1, rule) == v6
    assert training_head(client, name, v2, rule) == v2  # were v2 the champion, v6 would be 1.3 worse: not the head
    judged = {"champion.previous_version": v1, "champion.margin": "0.4"}  # the gate's (paired) margin against v1
    version(10.5, v6, judged)  # 0.5 worse: inside the unpaired 0.85, beyond the gate's 0.4
    assert training_head(client, name, v1, rule) == v6
    v8 = version(10.3, v6, judged)
    assert training_head(client, name, v1, rule) == v8


def test_distill_eval_registers_a_few_step_student_with_its_teacher_as_parent_scored_by_its_own_sampler(smoke_model):
    """A teacher through train-eval, then distill-eval of its version (one train-distill run): the student is a version of
    `ddpm-mnist-progressive2` naming its teacher, sampled only with its own 2-step sampler on the gate's budget,
    crowned in its own model (its first student), and served by MLflow with that sampler by default.
    Bad input (an alias the teacher's model lacks, levels progressive distillation cannot halve, a setting past
    its bound or outside a student's sections) is refused before any MLflow run is made."""
    import mlflow
    import pandas as pd

    from flows.distill_eval import distill_eval
    from flows.train_distill import train_distill

    client = MlflowClient()
    experiment = client.get_experiment_by_name("diffusion-mnist").experiment_id
    runs_before = len(client.search_runs([experiment]))
    student_settings = {"distill.method": "progressive", "distill.ode_steps": 4, "distill.sample_steps": 2,
                        "distill.steps": 4, "distill.batch_size": 8, "distill.warmup_steps": 0,
                        "distill.teacher_precision": "bf16"}
    with pytest.raises(ConfigError, match="no alias 'nightly-best'"):
        distill_eval(model="ddpm-mnist", alias="nightly-best", overrides=student_settings)
    with pytest.raises(ConfigError, match="distill.ode_steps=6"):
        distill_eval(model="ddpm-mnist", version="1", overrides={**student_settings, "distill.ode_steps": 6})
    with pytest.raises(ConfigError, match="distill.guidance=0.5 needs a class-conditional teacher"):  # ddpm-mnist has none
        distill_eval(model="ddpm-mnist", version="1", overrides={**student_settings, "distill.guidance": 0.5})
    with pytest.raises(ConfigError, match="distill.ode_steps=6"):  # the chained run refuses it before training
        train_distill(preset="smoke", overrides=FAST, distill_overrides={**student_settings, "distill.ode_steps": 6})
    with pytest.raises(ConfigError, match=r"parameter distill[.]steps refused: must be an integer from 1 to"):
        train_distill(preset="smoke", overrides=FAST, distill_overrides={**student_settings, "distill.steps": 10**9})
    with pytest.raises(ConfigError, match=r"parameter overrides\['data[.]source'\] refused"):  # a student reads no path
        distill_eval(model="ddpm-mnist", version="1", overrides={**student_settings, "data": {"source": "/srv/x"}})
    assert len(client.search_runs([experiment])) == runs_before  # refused before any run was made

    runs = train_distill(preset="smoke", overrides=FAST, distill_overrides=student_settings, num_samples=32)
    teacher_run, run_id = runs["teacher"], runs["student"]
    teacher = client.get_run(teacher_run).data.tags["model_version"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["distill.teacher"] == f"ddpm-mnist/{teacher}"
    assert run.data.tags["distill.teacher_run"] == teacher_run
    name, version = "ddpm-mnist-progressive2", run.data.tags["model_version"]
    tags = client.get_model_version(name, version).tags
    assert (tags["distill.teacher"], tags["distill.method"], tags["distill.sample_steps"], tags["distill.guidance"]) == (
        f"ddpm-mnist/{teacher}", "progressive", "2", "0.0")
    assert (tags["distill.ode_steps"], tags["distill.teacher_order"], tags["distill.loss_metric"],
            tags["distill.level_focus"], tags["distill.teacher_precision"]) == ("4", "1", "l2", "0.0", "bf16")
    assert tags["eval.sampler"] == "progressive2-log_snr" and tags["champion.decision"] == "promoted"
    assert {a: str(v) for a, v in client.get_registered_model(name).aliases.items()} == {CHALLENGER: version,
                                                                                          CHAMPION: version}
    assert f"ddpm-mnist v{teacher}" in client.get_model_version(name, version).description
    # only the student's own setting is sampled, on its gate's evaluation budget (the teacher's, under
    # whatever gate the teacher's model has in this session)
    samples = {p for p in _artifact_paths(client, run_id) if p.startswith("samples/")}
    assert samples == {"samples/progressive2.png", "samples/progressive2.safetensors"}
    images = load_file(client.download_artifacts(run_id, "samples/progressive2.safetensors"))["images"]
    budget = read_gate(client, name).protocol["evaluation.num_samples"]
    assert budget == load_registered_model(f"models:/ddpm-mnist/{teacher}").config.evaluation.num_samples
    assert images.shape == (budget, 1, 28, 28) and run.data.metrics["fid"] > 0
    assert {"loss_curve.png", "metrics.jsonl"} <= _artifact_paths(client, run_id)
    assert [json.loads(line)["step"] for line in Path(client.download_artifacts(run_id, "metrics.jsonl")).read_text()
            .splitlines()] == [4]  # smoke's log_every (50) is past the 4 steps: one report, at the end

    student = load_registered_model(f"models:/{name}@champion")
    teacher_model = load_registered_model(f"models:/ddpm-mnist/{teacher}")
    assert (student.config.sample.sampler, student.config.sample.steps) == ("progressive", 2)
    assert student.config.model == teacher_model.config.model  # the teacher's architecture
    served = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    defaults = {p.name: p.default for p in served.metadata.get_params_schema().params}
    assert (defaults["sampler"], defaults["steps"]) == ("progressive", 2)
    assert served.predict(pd.DataFrame(index=[0]), params={"n": 3}).shape == (3, 1, 28, 28)


def test_a_consistency_students_levels_travel_to_its_gate_its_score_and_its_served_images(smoke_model):
    """distill.sample_levels_log_snr goes into the student's config: its registered model's gate fixes them, its
    score names them, and MLflow serves images drawn at them (not at the spacing's levels)."""
    import mlflow
    import pandas as pd

    from flows.distill_eval import distill_eval

    client = MlflowClient()
    settings = {"distill.method": "consistency", "distill.sample_steps": 2, "distill.sample_levels_log_snr": [2.0],
                "distill.steps": 2, "distill.batch_size": 8, "distill.warmup_steps": 0}
    run_id = distill_eval(model="ddpm-mnist", overrides=settings)
    name, version = "ddpm-mnist-consistency2", client.get_run(run_id).data.tags["model_version"]
    assert read_gate(client, name).protocol["sample.levels_log_snr"] == [2.0]
    assert client.get_model_version(name, version).tags["eval.sampler"] == "consistency2-levels2"
    served = mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(pd.DataFrame(index=[0]),
                                                                          params={"n": 4, "seed": 3})
    student = load_registered_model(f"models:/{name}/{version}")
    assert student.config.sample.levels_log_snr == (2.0,)

    def drawn(sample_config: SampleConfig) -> torch.Tensor:
        return torch.cat(list(generate_batches(student.denoiser, student.denoiser.schedule, (1, 28, 28),
                                               sample_config.override(num_samples=4, seed=3), device="cpu",
                                               progress=False)))
    at_levels = drawn(student.config.sample)
    assert torch.equal(torch.from_numpy(served), at_levels)
    assert not torch.equal(at_levels, drawn(student.config.sample.override(levels_log_snr=(), steps=2)))
