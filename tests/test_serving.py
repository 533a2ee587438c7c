"""Registered versions are MLflow pyfunc models: loaded by `mlflow.pyfunc.load_model` in a fresh process and
served by `mlflow models serve`, their images bit-equal to `diffusion sample` with the same settings; bad
requests get a 400 that names the problem; an old version (MLmodel without flavor) is registered again
as a pyfunc model. MLflow on a SQLite file, Prefect's test harness for the flows and the champion lock."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from safetensors.torch import load_file

from diffusion_core import load_config
from diffusion_core.checkpoint import MODEL_FORMAT, load_model
from diffusion_core.config import ConfigError, SampleConfig
from diffusion_core.samplers import generate_batches
from flows.register import register_checkpoint
from flows.registry import CHAMPION, load_registered_model
from flows.reregister import reregister

pytestmark = pytest.mark.slow

COND = "ddpm-mnist-cond"
# two classes, two images each, at settings other than the model's defaults
REQUEST = {"class": [3, 7], "n": 2, "steps": 3, "seed": 5, "guidance": 1.5}
CLI_ARGS = ["--class", "3,7", "-n", "4", "--steps", "3", "--seed", "5", "--guidance", "1.5"]
UNCONDITIONAL = {"n": 2, "steps": 4, "seed": 9}  # no class column: the conditional model's ε̂(x, ∅)
UNCONDITIONAL_CLI_ARGS = ["--class", "none", "-n", "2", "--steps", "4", "--seed", "9"]
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def registry(tmp_path_factory, mnist_raw_source, data_dir):
    """MLflow on a SQLite file in a temporary folder and Prefect's test harness."""
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        patch.setenv("DIFFUSION_ARTIFACT_LOCATION", str(root / "artifacts"))
        with prefect_test_harness(server_startup_timeout=120):
            yield root


def _training_run(client: MlflowClient) -> str:
    """A run as train-eval leaves it before registering: the params the version tags copy."""
    experiment = client.create_experiment(f"e{time.monotonic_ns()}")
    run_id = client.create_run(experiment).info.run_id
    client.log_param(run_id, "dataset_sha256", "0" * 64)
    client.log_param(run_id, "git_commit", "1" * 40)
    return run_id


@pytest.fixture(scope="module")
def champion(registry, smoke_cond_run, mnist_raw_source, data_dir) -> str:
    """The trained conditional smoke model registered by the pipeline's registration flow, made champion."""
    client = MlflowClient()
    config = load_config("smoke", {"data.source": str(mnist_raw_source), "data.data_dir": str(data_dir),
                                   "model.num_classes": 10})
    version = register_checkpoint(_training_run(client), str(smoke_cond_run), config.to_dict())
    client.set_registered_model_alias(COND, CHAMPION, version)
    return version


def _run(args: list[str], timeout: float = 600) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **CPU_ONLY})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def reference(smoke_cond_run, tmp_path_factory) -> dict[str, torch.Tensor]:
    """`diffusion sample` of the trained model folder: the REQUEST and the unconditional request."""
    out = tmp_path_factory.mktemp("reference")
    images = {}
    for key, args in (("classes", CLI_ARGS), ("none", UNCONDITIONAL_CLI_ARGS)):
        _run([sys.executable, "-m", "diffusion_core.cli", "sample", "--model", str(smoke_cond_run / "model"),
              "--device", "cpu", "--tensor-out", str(out / f"{key}.safetensors"), *args])
        images[key] = load_file(out / f"{key}.safetensors")["images"]
    return images


FRESH_PROCESS = """
import sys, mlflow, pandas as pd, torch
from safetensors.torch import save_file
model = mlflow.pyfunc.load_model("models:/ddpm-mnist-cond@champion")
request = {"n": 2, "steps": 3, "seed": 5, "guidance": 1.5}
classes = model.predict(pd.DataFrame({"class": [3, 7]}), params=request)
none = model.predict(pd.DataFrame(index=[0]), params={"n": 2, "steps": 4, "seed": 9})
save_file({"classes": torch.from_numpy(classes), "none": torch.from_numpy(none)}, sys.argv[1])
"""


def test_the_champion_is_a_pyfunc_model_whose_images_equal_diffusion_sample(champion, reference, smoke_cond_run,
                                                                            tmp_path):
    client = MlflowClient()
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{COND}@{CHAMPION}", dst_path=str(tmp_path / "v")))
    flavor = Model.load(str(folder / "MLmodel")).flavors["python_function"]
    assert flavor["loader_module"] == "diffusion_core.serving" and not flavor.get("code")
    assert not [p for p in folder.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle", ".pt", ".py")]
    for name in ("model.safetensors", "config.json"):  # the exported model, byte for byte
        assert (folder / name).read_bytes() == (smoke_cond_run / "model" / name).read_bytes()
    requirements = (folder / "requirements.txt").read_text().split()
    assert f"diffusion-pipeline=={metadata.version('diffusion-pipeline')}" in requirements
    assert "torch==2.14.1" in requirements
    params = {p.name: p.default for p in Model.load(str(folder / "MLmodel")).signature.params.params}
    config = load_model(smoke_cond_run / "model").config  # the smoke preset: DDIM, 10 steps, seed 0, w = 0
    assert params == {"n": 1, "sampler": "ddim", "steps": 10, "guidance": config.sample.guidance, "seed": 0}
    assert client.get_model_version(COND, champion).tags["num_classes"] == "10"

    _run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "pyfunc.safetensors")])
    got = load_file(tmp_path / "pyfunc.safetensors")
    assert got["classes"].shape == (4, 1, 28, 28) and got["classes"].dtype == torch.uint8
    assert torch.equal(got["classes"], reference["classes"])
    assert torch.equal(got["none"], reference["none"])
    # the project's own loader reads the new layout too
    assert load_registered_model(f"models:/{COND}@{CHAMPION}").config == config


class Server:
    """`mlflow models serve` of the champion on a free loopback port, in its own process group."""

    def __init__(self, log: Path, start_timeout_s: float = 300) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{COND}@{CHAMPION}",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(self.port), "-w", "1"]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **CPU_ONLY})
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=5):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"server not up within {start_timeout_s} s:\n{log.read_text()[-3000:]}")
                time.sleep(1)

    def invoke(self, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"{self.url}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
        self.proc.wait()


def test_mlflow_serves_the_champion_and_refuses_bad_requests_with_400(champion, reference, tmp_path):
    server = Server(tmp_path / "serve.log")
    try:
        params = {k: v for k, v in REQUEST.items() if k != "class"}
        status, answer = server.invoke({"dataframe_records": [{"class": 3}, {"class": 7}], "params": params})
        assert status == 200, answer
        assert torch.equal(torch.tensor(answer["predictions"], dtype=torch.uint8), reference["classes"])
        status, answer = server.invoke({"dataframe_records": [{}], "params": UNCONDITIONAL})
        assert status == 200, answer
        assert torch.equal(torch.tensor(answer["predictions"], dtype=torch.uint8), reference["none"])
        for body, says in ((({"inputs": {"class": [3, 12]}}), "unknown class"),
                           ({"inputs": {"class": [3]}, "params": {"steps": 0}}, "steps = 0"),
                           ({"inputs": {"class": [3]}, "params": {"steps": 101}}, "1 to 100 steps"),
                           ({"inputs": {"class": [3, 4]}, "params": {"n": 200}}, "n at most 128"),
                           ({"inputs": {"class": [3]}, "params": {"sampler": "euler"}}, "sampler 'euler' is unknown"),
                           ({"inputs": {"class": [3]}, "params": {"steps": "many"}}, "steps")):
            status, answer = server.invoke(body)
            assert status == 400 and says in answer["message"], (body, status, answer)
    finally:
        server.stop()


def _register_the_old_way(client: MlflowClient, model_folder: Path, name: str, tmp_path: Path) -> str:
    """A version as registration wrote it before the pyfunc flavor: the model folder with a flavorless MLmodel."""
    run_id = _training_run(client)
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    Model(artifact_path="model", run_id=run_id, metadata={"format": MODEL_FORMAT}).save(folder / "MLmodel")
    client.log_artifacts(run_id, str(folder), "model")
    return str(mlflow.register_model(f"runs:/{run_id}/model", name,
                                     tags={"eval.fid": "12.5", "eval.sampler": "ddim10-eta0-linear", "preset": "smoke",
                                           "champion.decision": "promoted"}).version)


def test_an_old_version_stays_loadable_and_is_registered_again_as_a_pyfunc_model(registry, smoke_run, tmp_path):
    client = MlflowClient()
    name = "ddpm-mnist-old"
    old = _register_the_old_way(client, smoke_run / "model", name, tmp_path)
    client.set_registered_model_alias(name, CHAMPION, old)
    before = load_registered_model(f"models:/{name}/{old}")  # the project's loader reads old versions
    with pytest.raises(MlflowException, match="python_function"):
        mlflow.pyfunc.load_model(f"models:/{name}/{old}")

    new, moved = reregister(client, name, old)
    assert (moved, str(client.get_registered_model(name).aliases[CHAMPION])) == ([CHAMPION], new)
    tags = client.get_model_version(name, new).tags
    assert tags["reregistered_from"] == str(old) and tags["eval.fid"] == "12.5" and tags["preset"] == "smoke"
    assert "champion.decision" not in tags
    run = client.get_run(client.get_model_version(name, new).run_id)
    assert run.data.tags["reregistered_from"] == f"{name}/{old}" and run.info.status == "FINISHED"
    folders = [Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{v}", dst_path=str(tmp_path / v)))
               for v in (old, new)]
    assert (folders[0] / "model.safetensors").read_bytes() == (folders[1] / "model.safetensors").read_bytes()

    images = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}").predict(
        pd.DataFrame(index=[0]), params={"n": 3, "steps": 2, "seed": 4})
    settings = SampleConfig(sampler="ddim", steps=2, spacing="linear", num_samples=3, seed=4)
    (expected,) = generate_batches(before.denoiser, before.denoiser.schedule, (1, 28, 28), settings, device="cpu",
                                   progress=False)
    assert torch.equal(torch.from_numpy(images), expected)
    with pytest.raises(ConfigError, match="already is a python_function model"):
        reregister(client, name, new)
