"""End to end: the local stack (infra/stack.sh: S3 endpoint, MLflow server with S3 artifacts, Prefect
server, the serve process) on free loopback ports, MNIST raw files in the bucket, and deployment runs
triggered from the Prefect CLI exactly as a user would. Runs in CI (marked slow only so that a
developer can deselect it locally)."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from uuid import UUID

import boto3
import pytest
import requests
from mlflow import MlflowClient
from prefect.client.orchestration import SyncPrefectClient
from prefect.states import Scheduled

from diffusion_core import load_config
from flows.tracking import git_commit

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
STACK = str(REPO / "infra" / "stack.sh")
BUCKET = "e2e-artifacts"
SECRET = "e2e-secret-never-logged"
# Cheap settings (T = 20, DDIM with 5 steps, 32 images); the first run is trained enough to beat the second.
COMMON = {"diffusion.timesteps": 20, "sample.steps": 5, "train.lr": 3e-3}
GOOD, WORSE = {**COMMON, "train.steps": 40}, {**COMMON, "train.steps": 1}
NUM_SAMPLES = 32
RUN_TIMEOUT_S = 600
POOL = "e2e-pool"
# infra/README.md's registration of a deployment on a work pool, with the local checkout (argv[1]) as the source.
DEPLOY_TO_POOL = """
import sys
from prefect import flow
flow.from_source(sys.argv[1], "flows/train_eval.py:train_eval").deploy(
    name="pool", work_pool_name=sys.argv[2], parameters={"preset": "smoke"})
"""
# The primary score's keys on every run: the MLflow run table's shared columns (the list, kept
# here on purpose rather than imported from flows.evaluate, so that dropping one there fails the test).
HEADLINE_KEYS = {"fid", "fid_std", "kid", "kid_std", "precision", "recall", "confident", "class_entropy"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stack(env: dict[str, str], command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([STACK, command], env=env, capture_output=True, text=True, timeout=timeout)


def _tear_down(env: dict[str, str], state: Path) -> None:
    """`stack.sh down`, then make sure every process group it started is gone (kill what is left)."""
    pids = [int(p.read_text()) for p in (state / "pids").glob("*.pid")] if (state / "pids").is_dir() else []
    down = _stack(env, "down", timeout=180)
    survivors = []
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
            survivors.append(pid)
        except ProcessLookupError:
            pass
    assert down.returncode == 0 and not survivors, (down.stdout, down.stderr, survivors)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, mnist_raw_source, request):
    """The stack up on free ports with MNIST uploaded; torn down (process groups killed) whatever happens."""
    root = tmp_path_factory.mktemp("stack")
    ports = {name: _free_port() for name in ("S3", "MLFLOW", "PREFECT")}
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "DIFFUSION_ARTIFACT_LOCATION")}
    env.update({f"STACK_{name}_PORT": str(port) for name, port in ports.items()})
    env.update({"STACK_ENV_FILE": str(root / "absent.env"), "STACK_DIR": str(root / "state"), "STACK_TIMEOUT": "300",
                "DIFFUSION_S3_BUCKET": BUCKET, "DIFFUSION_DATA_SOURCE": f"s3://{BUCKET}/datasets/mnist",
                "DIFFUSION_RUNS_DIR": str(root / "runs"), "DIFFUSION_DATA_DIR": str(root / "data"),
                "AWS_ACCESS_KEY_ID": "e2e-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                "PREFECT_HOME": str(root / "prefect-client"), "PYTHON": sys.executable})
    request.addfinalizer(lambda: _tear_down(env, root / "state"))
    up = _stack(env, "up", timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    exports = _stack(env, "env", timeout=30).stdout.splitlines()  # export NAME=value
    env.update(line.removeprefix("export ").split("=", 1) for line in exports)
    s3 = boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id="e2e-key",
                      aws_secret_access_key=SECRET, region_name="us-east-1")
    for raw in sorted(mnist_raw_source.glob("*.gz")):
        s3.upload_file(str(raw), BUCKET, f"datasets/mnist/{raw.name}")
    with pytest.MonkeyPatch.context() as patch:  # this process's MLflow client talks to the stack's server
        patch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        yield SimpleNamespace(env=env, s3=s3, mlflow=MlflowClient(env["MLFLOW_TRACKING_URI"]), root=root)


def _processes() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, process group) of every process, from /proc/<pid>/stat (fields 4 and 5)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name: state, ppid, pgrp, …
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
        except (OSError, IndexError, ValueError):  # exited meanwhile
            pass
    return table


def _group_environments(leader: int) -> list[dict[str, str]]:
    """The environment of every process in the process group `leader` leads (a service and its children)."""
    found = []
    for pid, (_, group) in _processes().items():
        if group == leader:
            try:
                items = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
                found.append(dict(item.split("=", 1) for item in items if "=" in item))
            except OSError:  # exited meanwhile
                pass
    return found


def test_only_the_processes_that_use_s3_hold_its_secret(stack):
    """Read from each service's processes: the MLflow server (it proxies artifacts) holds the S3 secret,
    and the serve process because this stack's dataset is on S3; the S3 endpoint and Prefect do not."""
    holds = {}
    for pid_file in sorted((stack.root / "state" / "pids").glob("*.pid")):
        environments = _group_environments(int(pid_file.read_text()))
        assert environments, pid_file.stem
        holds[pid_file.stem] = {any(SECRET in value for value in env.values()) for env in environments}
    assert holds == {"s3": {False}, "mlflow": {True}, "prefect": {False}, "serve": {True}}


def _prefect(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The Prefect CLI (`prefect ARGS…`) with `env`, as a user's shell runs it."""
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _run_deployment(stack, overrides: dict, deployment: str = "train-eval/adhoc") -> str:
    """`prefect deployment run DEPLOYMENT --watch`; assert it completed; return the MLflow run id."""
    done = _prefect(stack.env, "deployment", "run", deployment, "--param", "preset=smoke",
                    "--param", f"overrides={json.dumps(overrides)}", "--param", f"num_samples={NUM_SAMPLES}",
                    "--watch", "--watch-timeout", str(RUN_TIMEOUT_S), timeout=RUN_TIMEOUT_S + 60)
    assert done.returncode == 0 and "Completed" in done.stdout, done.stdout + done.stderr
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout).group(1)
    (run,) = stack.mlflow.search_runs(
        [stack.mlflow.get_experiment_by_name("diffusion-mnist").experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    return run.info.run_id


@pytest.fixture(scope="module")
def first_run(stack) -> str:
    return _run_deployment(stack, GOOD)


def test_deployment_run_is_tracked_registered_and_stored_in_s3(stack, first_run):
    client = stack.mlflow
    run = client.get_run(first_run)
    assert run.info.status == "FINISHED" and run.data.tags["prefect.deployment"] == "adhoc"
    params = run.data.params
    config = load_config("smoke", {**GOOD, "sample.num_samples": NUM_SAMPLES, "sample.spacing": "linear",  # the gate's
                                   "data.source": f"s3://{BUCKET}/datasets/mnist", "data.data_dir": "unused"})
    assert all(params[k] == str(v) for k, v in config.flat().items() if k != "data.data_dir")
    assert {"git_commit", "dataset_sha256", "torch_version", "device", "world_size"} <= set(params)
    assert SECRET not in json.dumps([params, run.data.tags])
    assert [m.step for m in client.get_metric_history(first_run, "loss")][-1] == 40
    assert {"lr", "images_per_s", "fid_lenet_ddim5", "fid_lenet_ddpm20", "sampling_images_per_s_ddim5"} <= set(
        run.data.metrics)
    (dataset_input,) = run.inputs.dataset_inputs
    assert json.loads(dataset_input.dataset.source)["uri"] == f"s3://{BUCKET}/datasets/mnist"

    aliases = {alias: str(v) for alias, v in client.get_registered_model("ddpm-mnist").aliases.items()}
    assert aliases == {"challenger": "1", "champion": "1"}

    keys = {o["Key"] for page in stack.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])}
    prefix = f"mlflow/{run.info.experiment_id}/{first_run}/artifacts/"
    for name in ("config.json", "forward_process.png", "loss_curve.png", "checkpoints/last.safetensors",
                 "model/model.safetensors", "model/config.json", "samples/ddim5.png", "samples/ddpm20.png",
                 "samples/ddim5.safetensors", "evaluation.json"):
        assert prefix + name in keys, name


@pytest.fixture(scope="module")
def worse_runs(stack, first_run) -> list[str]:
    """Two worse runs started at the same time, after the first run (versions 2 and 3)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda overrides: _run_deployment(stack, overrides), [WORSE, {**WORSE, "train.seed": 1}]))


def test_two_concurrent_worse_runs_keep_apart_and_do_not_take_champion(stack, first_run, worse_runs):
    """A nightly and an ad-hoc run at the same time: separate MLflow runs, folders and versions; neither,
    being worse, moves `champion`."""
    runs = worse_runs
    client = stack.mlflow
    first_fid = client.get_run(first_run).data.metrics["fid_lenet_ddim5"]
    infos = [client.get_run(run_id) for run_id in runs]
    assert len(set(runs)) == 2 and all(r.info.status == "FINISHED" for r in infos)
    work_dirs = [Path(r.data.tags["work_dir"]) for r in infos]
    assert work_dirs[0] != work_dirs[1] and work_dirs[0].parent == work_dirs[1].parent
    for work_dir, info in zip(work_dirs, infos):  # each folder holds its own run's config
        assert json.loads((work_dir / "config.json").read_text())["train"]["seed"] == int(info.data.params["train.seed"])
    versions = sorted(r.data.tags["model_version"] for r in infos)
    assert versions == ["2", "3"]
    aliases = {alias: str(v) for alias, v in client.get_registered_model("ddpm-mnist").aliases.items()}
    assert aliases["champion"] == "1" and aliases["challenger"] in versions
    for info in infos:
        version = client.get_model_version("ddpm-mnist", info.data.tags["model_version"])
        assert version.run_id == info.info.run_id  # each version points at its own run's files
        second_fid = info.data.metrics["fid_lenet_ddim5"]
        assert second_fid > first_fid
        for tags in (version.tags, info.data.tags):
            assert tags["champion.decision"] == "kept"
            assert (float(tags["champion.candidate_fid"]), float(tags["champion.previous_fid"])) == (second_fid, first_fid)


def _rest(stack, path: str, params: dict | None = None, body: dict | None = None) -> dict:
    """MLflow's REST API (`/api/2.0/mlflow/<path>`, the handlers behind the UI's own `ajax-api` calls):
    GET with `params`, or POST `body`."""
    url = f"{stack.env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/{path}"
    response = requests.post(url, json=body, timeout=30) if body else requests.get(url, params=params, timeout=30)
    assert response.ok, (url, response.status_code, response.text)
    return response.json()


def _pairs(items: list[dict]) -> dict[str, str]:
    return {item["key"]: item["value"] for item in items}


def test_mlflow_ui_shows_headline_columns_source_and_champion(stack, first_run, worse_runs):
    """The data behind the screenshots in docs/ (infra/mlflow_screenshots.py), read as the UI reads it.
    Run table and compare view (runs/search): every finished train-eval run has the headline keys, equal
    to the primary sampler's detailed ones, and the Source, Version (git commit) and User fields; run
    page: its pictures are listed. Model page (registered-models/get, model-versions/search): `champion`
    is the first (best) run's version, `challenger` a later one, each tagged with its run's FID, FID's
    standard error and its champion decision."""
    experiment = _rest(stack, "experiments/get-by-name", {"experiment_name": "diffusion-mnist"})["experiment"]
    runs = _rest(stack, "runs/search", body={"experiment_ids": [experiment["experiment_id"]], "max_results": 1000,
                                             "filter": "attributes.status = 'FINISHED'"})["runs"]
    by_id = {run["info"]["run_id"]: run for run in runs}
    assert {first_run, *worse_runs} <= set(by_id)
    metrics = {run_id: {m["key"]: m["value"] for m in run["data"]["metrics"]} for run_id, run in by_id.items()}
    tags = {run_id: _pairs(run["data"]["tags"]) for run_id, run in by_id.items()}
    assert re.fullmatch("[0-9a-f]{40}", git_commit())
    for run_id in by_id:
        scored, tagged = metrics[run_id], tags[run_id]
        assert HEADLINE_KEYS <= set(scored), (run_id, sorted(HEADLINE_KEYS - set(scored)))
        assert scored["fid"] == scored["fid_lenet_ddim5"] and scored["fid_std"] > 0
        assert (tagged["mlflow.source.name"], tagged["mlflow.source.type"]) == ("flows/train_eval.py", "LOCAL")
        assert tagged["mlflow.source.git.commit"] == git_commit() and tagged["mlflow.user"]
        listed = {f["path"] for folder in ("", "samples")
                  for f in _rest(stack, "artifacts/list", {"run_id": run_id, "path": folder}).get("files", [])}
        assert {"loss_curve.png", "forward_process.png", "samples/ddim5.png", "samples/ddpm20.png"} <= listed, listed

    model = _rest(stack, "registered-models/get", {"name": "ddpm-mnist"})["registered_model"]
    aliases = {alias["alias"]: alias["version"] for alias in model["aliases"]}
    found = _rest(stack, "model-versions/search", {"filter": "name='ddpm-mnist'"})["model_versions"]
    versions = {version["version"]: version for version in found}
    assert aliases["champion"] == tags[first_run]["model_version"]
    assert aliases["challenger"] in {tags[run_id]["model_version"] for run_id in worse_runs}
    for alias, decision in (("champion", "promoted"), ("challenger", "kept")):
        version = versions[aliases[alias]]
        version_tags, scored = _pairs(version["tags"]), metrics[version["run_id"]]
        score = float(version_tags["eval.fid"]), float(version_tags["eval.fid_std"])
        assert score == (scored["fid"], scored["fid_std"]), (alias, version_tags)
        assert version_tags["champion.decision"] == decision, (alias, version_tags)


def _prefect_api(stack, path: str) -> dict:
    with urllib.request.urlopen(stack.env["PREFECT_API_URL"] + path, timeout=30) as response:
        return json.load(response)


def _kill_groups_below(leader: int) -> None:
    """SIGKILL the process group `leader` leads and the group of every process below it: a process worker
    starts each flow run in a session of its own, and the flow run starts torchrun in another."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    below, todo = set(), [leader] + [pid for pid, (_, group) in table.items() if group == leader]
    while todo:
        pid = todo.pop()
        if pid not in below:
            below.add(pid)
            todo += children.get(pid, [])
    for group in ({leader} | {table[pid][1] for pid in below if pid in table}) - {os.getpgrp()}:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def pool_worker(stack, request):
    """A process work pool on the stack's Prefect server and a worker polling it (infra/README.md), as another
    machine runs it: its own process group (it and every group below it killed whatever happens), its own
    runs and data folders, the stack's client settings, S3 credentials and DIFFUSION_DATA_SOURCE."""
    created = _prefect(stack.env, "work-pool", "create", POOL, "--type", "process", timeout=300)
    assert created.returncode == 0, created.stdout + created.stderr
    root = (stack.root / "worker").resolve()
    root.mkdir()
    env = {**stack.env, "DIFFUSION_RUNS_DIR": str(root / "runs"), "DIFFUSION_DATA_DIR": str(root / "data"),
           "PREFECT_HOME": str(root / "prefect")}
    log = root / "worker.log"
    with log.open("ab") as out:
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL], env=env,
                                  cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    request.addfinalizer(lambda: (_kill_groups_below(worker.pid), worker.wait(timeout=30)))
    deadline = time.monotonic() + 300
    while _prefect_api(stack, f"/work_pools/{POOL}")["status"] != "READY":  # a worker has sent a heartbeat
        assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    return SimpleNamespace(log=log, root=root)


def test_deployment_on_a_work_pool_runs_on_its_worker_and_registers_a_version(stack, pool_worker):
    """infra/README.md's work-pool route: a deployment of the local checkout on a process pool, run with
    `prefect deployment run … --watch`, is executed by the pool's worker in the worker's environment,
    records the checkout's commit and registers a model version that points at its MLflow run."""
    deployed = subprocess.run([sys.executable, "-c", DEPLOY_TO_POOL, str(REPO), POOL], env=stack.env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    run_id = _run_deployment(stack, WORSE, deployment="train-eval/pool")
    run = stack.mlflow.get_run(run_id)
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    flow_run = _prefect_api(stack, f"/flow_runs/{flow_run_id}")
    assert (flow_run["work_pool_name"], flow_run["state_type"]) == (POOL, "COMPLETED")
    assert flow_run_id in pool_worker.log.read_text()  # the worker picked it up …
    assert Path(run.data.tags["work_dir"]).parent == pool_worker.root / "runs"  # … and ran it in its environment
    assert run.info.status == "FINISHED" and run.data.tags["prefect.deployment"] == "pool"
    assert run.data.params["git_commit"] == git_commit()
    version = stack.mlflow.get_model_version("ddpm-mnist", run.data.tags["model_version"])
    assert version.run_id == run_id


def test_no_credential_in_logs_files_params_or_the_bucket(stack, first_run):
    """The secret key is in every process's environment; it must not be written anywhere."""
    needle = SECRET.encode()
    leaks = [str(p) for p in stack.root.rglob("*") if p.is_file() and needle in p.read_bytes()]
    for page in stack.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            if needle in stack.s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read():
                leaks.append(f"s3://{BUCKET}/{obj['Key']}")
    runs = stack.mlflow.search_runs([stack.mlflow.get_experiment_by_name("diffusion-mnist").experiment_id])
    leaks += [r.info.run_id for r in runs if SECRET in json.dumps([r.data.params, r.data.tags])]
    assert len(runs) >= 1 and not leaks, leaks


class _Hook(http.server.BaseHTTPRequestHandler):
    """Records every POST as (time received, path, JSON body) in the server's `received` list."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.received.append((time.time(), self.path, body))  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture()
def webhook():
    """An HTTP listener on 127.0.0.1 (a thread of this process) standing in for the alerts' webhook."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _alerts(env: dict[str, str], command: str) -> subprocess.CompletedProcess:
    """`python -m flows.alerts COMMAND` with `env`."""
    return subprocess.run([sys.executable, "-m", "flows.alerts", command], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _states(stack, flow_run_id: str) -> list[tuple[datetime, str, str]]:
    """A flow run's states from the Prefect API: (time, type, name), oldest first."""
    states = _prefect_api(stack, f"/flow_run_states/?flow_run_id={flow_run_id}")
    return sorted((datetime.fromisoformat(s["timestamp"]), s["type"], s["name"]) for s in states)


def test_nightly_runs_one_at_a_time_and_alerts_reach_the_webhook(stack, webhook):
    """Alerts installed with `python -m flows.alerts install` (a 15 s silence window instead of 26 h) and
    two runs of train-eval/nightly due at the same moment, each refused before any work (a preset that does
    not exist), so both fail. The second waits for the first (deployment concurrency limit 1, ENQUEUE):
    it starts no earlier than the first ends. The listener receives a failure alert for each run within
    60 s of its end, naming the run, its state and deployment, and the silence alert (no completed
    nightly run) within 60 s of the window's end and not before it; the URL's token appears in no log. The
    stack's own serve process, started without a webhook URL, said that alerts are off."""
    token, window_s = "alert-url-token-never-logged", 15
    env = {**stack.env, "DIFFUSION_ALERT_WEBHOOK_URL": f"http://127.0.0.1:{webhook.server_port}/hook?token={token}",
           "DIFFUSION_ALERT_NIGHTLY_WINDOW": f"{window_s}s"}
    try:
        before_install = time.time()
        installed = _alerts(env, "install")
        assert installed.returncode == 0, installed.stdout + installed.stderr
        again = _alerts(env, "install")  # idempotent: the same automations, one of each
        assert again.returncode == 0 and again.stdout == installed.stdout, (installed.stdout, again.stdout)
        assert token not in installed.stdout + installed.stderr + again.stdout + again.stderr

        nightly = _prefect_api(stack, "/deployments/name/train-eval/nightly")
        due = datetime.now(timezone.utc) + timedelta(seconds=12)  # past the runner's 10 s prefetch
        # Through Prefect's own client, as `prefect deployment run` does: it retries the 503 that the server
        # answers when SQLite reports "database is locked" under load (infra/README.md, "Under load").
        with SyncPrefectClient(stack.env["PREFECT_API_URL"]) as client:
            ids = [str(client.create_flow_run_from_deployment(
                UUID(nightly["id"]), parameters={"preset": "no-such-preset"}, state=Scheduled(scheduled_time=due)).id)
                for _ in range(2)]
        deadline = time.monotonic() + 300
        while True:
            runs = [_prefect_api(stack, f"/flow_runs/{i}") for i in ids]
            states = {r["state_type"] for r in runs}
            if states == {"FAILED"}:
                break
            assert not {"COMPLETED", "CANCELLED", "CRASHED"} & states, runs
            assert time.monotonic() < deadline, [_states(stack, i) for i in ids]
            time.sleep(2)
        first, second = runs = sorted(runs, key=lambda r: r["start_time"])
        assert all("no-such-preset" in r["state"]["message"] for r in runs), [r["state"]["message"] for r in runs]
        first_end, second_states = datetime.fromisoformat(first["end_time"]), _states(stack, second["id"])
        # Not even handed to a process (Pending: the runner starts its subprocess) until the first had ended …
        assert max(at for at, kind, _ in second_states if kind == "PENDING") >= first_end, (first_end, second_states)
        assert datetime.fromisoformat(second["start_time"]) >= first_end, runs  # … so it ran after it
        assert "AwaitingConcurrencySlot" in [name for _, _, name in second_states], second_states
        assert (nightly["global_concurrency_limit"]["limit"], nightly["concurrency_options"]["collision_strategy"]) == (
            1, "ENQUEUE")

        ends = [datetime.fromisoformat(r["end_time"]).timestamp() for r in runs]
        deadline = max(ends + [before_install + window_s]) + 60
        while True:  # the alerts by subject: (time received, body)
            received = list(webhook.received)
            failed = {r["name"]: (at, body) for at, _, body in received for r in runs
                      if body["subject"] == f"train-eval run {r['name']} Failed"}
            silent = [(at, body) for at, _, body in received
                      if body["subject"] == "No completed run of train-eval/nightly"]
            if len(failed) == 2 and silent:
                break
            assert time.time() < deadline, received
            time.sleep(1)
        assert all(path == f"/hook?token={token}" for _, path, _ in received), received
        for run, end in zip(runs, ends):
            at, body = failed[run["name"]]
            assert at - end <= 60, (at, end)
            for part in (run["name"], "Failed", "deployment: train-eval/nightly", run["id"], "no-such-preset"):
                assert part in body["body"], (part, body)
        at, body = silent[0]
        assert before_install + window_s <= at <= before_install + window_s + 60, (at, before_install)
        window = re.escape(str(timedelta(seconds=window_s)))  # 0:00:15
        since, checked = re.search(rf"completed since (\S+) \(window {window}, checked at (\S+)\)",
                                   body["body"]).groups()
        assert datetime.fromisoformat(checked) - datetime.fromisoformat(since) == timedelta(seconds=window_s)
        assert datetime.fromisoformat(since).timestamp() >= before_install - 1
        logs = stack.root / "state" / "logs"
        assert "alerts are off" in (logs / "serve.log").read_text()  # the stack's serve runs without the URL
        assert not [p.name for p in logs.iterdir() if token in p.read_text(errors="replace")]
    finally:  # the automations go, whatever happened
        removed = _alerts(env, "remove")
    assert removed.returncode == 0 and "diffusion-alerts" in removed.stdout, removed.stdout + removed.stderr
