"""Load test of the local stack (infra/stack.sh) on one database backend: many deployment runs at once.

    python benchmarks/load_test.py --backend sqlite|postgres [--runs 8] [--timeout 1800] \
        [--out benchmarks/results/load]

Brings the stack up in a fresh state folder on free loopback ports with STACK_DB=<backend> (the MLflow
and Prefect servers on SQLite files or on the stack's PostgreSQL), submits `--runs` runs of
`train-eval/adhoc` with `preset=smoke` (cheaper: see PARAMETERS) in one burst (concurrent API calls), waits for every run to end
or for `--timeout` seconds, then stops the stack (runs still running end with it) and kills whatever its
processes left. The dataset
comes from $DIFFUSION_DATA_SOURCE (a folder of the MNIST raw files).

Prints and writes `<out>/<backend>.json`: runs submitted, how many ended in each state, each run's
state, message and duration (Prefect's start to end), the wall time from submission to the last end,
how often the services' logs say "database is locked" or similar, and the fp32 matmul GFLOP/s measured
before and after in the same process (the machine's speed drifts; wall times mean little without it).
The Prefect server logs the database errors it answers with 503 (PREFECT_SERVER_LOG_RETRYABLE_ERRORS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diffusion_core.runtime import matmul_gflops

REPO = Path(__file__).resolve().parent.parent
STACK = str(REPO / "infra" / "stack.sh")
DEPLOYMENT = "train-eval/adhoc"
# The smoke preset with tests/test_e2e.py's cheaper diffusion (T = 20, DDIM with 5 steps) and 16 images for
# the grids and the DDPM setting: each run still makes every API call a real run makes (Prefect subflows,
# MLflow params, metrics, artifacts, a registered version, the champion decision).
PARAMETERS = {"preset": "smoke", "overrides": {"diffusion.timesteps": 20, "sample.steps": 5}, "num_samples": 16}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# What the services' logs are searched for (case-insensitive): SQLite's lock errors and their kin. The Prefect
# server answers a database error that clients may retry with 503 and logs one "retryable exception" line for it
# (the traceback that follows names the error, "database is locked" twice: SQLite's and SQLAlchemy's).
ERROR_PATTERNS = ("retryable exception", "database is locked", "sqlite_busy", "operationalerror",
                  "503 service unavailable", "too many connections", "deadlock detected")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stack_env(backend: str, root: Path, data_source: str) -> dict[str, str]:
    """The environment for infra/stack.sh: `backend`, state under `root`, free ports, no settings file."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "DIFFUSION_ARTIFACT_LOCATION")}
    env.update({f"STACK_{name}_PORT": str(free_port()) for name in ("S3", "MLFLOW", "PREFECT", "POSTGRES")})
    env.update({"STACK_DB": backend, "STACK_DIR": str(root / "state"), "STACK_ENV_FILE": str(root / "absent.env"),
                "STACK_TIMEOUT": "600", "PYTHON": sys.executable, "DIFFUSION_DATA_SOURCE": data_source,
                "PREFECT_HOME": str(root / "prefect-client"), "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"})
    return env


def stack(env: dict[str, str], command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([STACK, command], env=env, capture_output=True, text=True, timeout=timeout)


def process_table() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, process group), from /proc/<pid>/stat."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
        except (OSError, IndexError, ValueError):
            pass
    return table


def kill_below(leader: int) -> int:
    """SIGKILL every process group below the group `leader` leads, but not that one: any session that a
    flow run still running started for itself, which `stack.sh down` would not reach. How many."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    below, todo = set(), [leader]
    while todo:
        pid = todo.pop()
        if pid not in below:
            below.add(pid)
            todo += children.get(pid, [])
    groups = {table[pid][1] for pid in below if pid in table} - {leader, os.getpgrp()}
    killed = 0
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


def group_alive(leader: int) -> bool:
    try:
        os.killpg(leader, 0)
        return True
    except ProcessLookupError:
        return False


async def submit_and_wait(runs: int, timeout: float) -> tuple[list[dict], float]:
    """Create `runs` flow runs of the deployment at once, poll until all have ended or `timeout` passed;
    each run's final (or last seen) state and durations, and the seconds from submission to the last end."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployment = await client.read_deployment_by_name(DEPLOYMENT)
        submitted = time.monotonic()
        created = await asyncio.gather(*(client.create_flow_run_from_deployment(
            deployment.id, parameters=PARAMETERS) for _ in range(runs)), return_exceptions=True)
        ids = [run.id for run in created if not isinstance(run, BaseException)]
        refused = [f"{type(e).__name__}: {e}" for e in created if isinstance(e, BaseException)]
        pending, last_end = set(ids), submitted
        while pending and time.monotonic() - submitted < timeout:
            await asyncio.sleep(5)
            for run_id in list(pending):
                try:
                    state = (await client.read_flow_run(run_id)).state_type.value
                except Exception as error:  # an API error under load is data, not the end of the test
                    print(f"polling {run_id}: {type(error).__name__}: {error}", flush=True)
                    continue
                if state in TERMINAL:
                    pending.discard(run_id)
                    last_end = time.monotonic()
                    print(f"{run_id}: {state} ({len(ids) - len(pending)}/{len(ids)} ended)", flush=True)
        results = []
        for run_id in ids:
            run = await client.read_flow_run(run_id)
            duration = (run.end_time - run.start_time).total_seconds() if run.start_time and run.end_time else None
            results.append({"flow_run_id": str(run_id), "state": run.state_type.value,
                            "message": run.state.message if run.state else None, "duration_s": duration})
        results += [{"flow_run_id": None, "state": "NOT_CREATED", "message": message, "duration_s": None}
                    for message in refused]
    return results, (last_end if not pending else time.monotonic()) - submitted


def errors_in_logs(logs: Path) -> dict[str, dict[str, int]]:
    """For each pattern found, the number of lines of each service's log that contain it."""
    found: dict[str, dict[str, int]] = {}
    for log in sorted(logs.glob("*.log")):
        lines = log.read_text(errors="replace").lower().splitlines()
        for pattern in ERROR_PATTERNS:
            count = sum(pattern in line for line in lines)
            if count:
                found.setdefault(pattern, {})[log.name] = count
    return found


def load_test(backend: str, runs: int, timeout: float, data_source: str, keep: Path | None) -> dict:
    peak_before = matmul_gflops()
    root = Path(tempfile.mkdtemp(prefix=f"load-{backend}-"))
    root.chmod(0o711)  # the PostgreSQL server's user must be able to enter the state folder
    env = stack_env(backend, root, data_source)
    state = root / "state"
    started = time.monotonic()
    try:
        up = stack(env, "up", timeout=900)
        if up.returncode != 0:
            raise RuntimeError(f"infra/stack.sh up failed:\n{up.stdout}\n{up.stderr}")
        up_s = time.monotonic() - started
        exports = stack(env, "env", timeout=60).stdout.splitlines()
        os.environ.update(line.removeprefix("export ").split("=", 1) for line in exports)
        os.environ["PREFECT_HOME"] = env["PREFECT_HOME"]
        results, wall_s = asyncio.run(submit_and_wait(runs, timeout))
    finally:
        serve = state / "pids" / "serve.pid"
        killed = kill_below(int(serve.read_text())) if serve.exists() else 0
        leaders = [int(p.read_text()) for p in (state / "pids").glob("*.pid")]
        down = stack(env, "down", timeout=300)
        survivors = [pid for pid in leaders if group_alive(pid)]
        for pid in survivors:
            os.killpg(pid, signal.SIGKILL)
        errors = errors_in_logs(state / "logs")
        if keep is not None:
            shutil.copytree(state / "logs", keep / f"{backend}-logs", dirs_exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
    counts: dict[str, int] = {}
    for result in results:
        counts[result["state"]] = counts.get(result["state"], 0) + 1
    return {
        "backend": backend, "deployment": DEPLOYMENT, "parameters": PARAMETERS,
        "runs_submitted": runs, "completed": counts.get("COMPLETED", 0),
        "failed": counts.get("FAILED", 0), "crashed": counts.get("CRASHED", 0), "states": counts,
        "wall_s": round(wall_s, 1), "timeout_s": timeout, "stack_up_s": round(up_s, 1),
        "durations_s": sorted(round(r["duration_s"], 1) for r in results if r["duration_s"] is not None),
        "runs": results, "log_errors": errors, "down_returncode": down.returncode,
        "flow_run_groups_killed": killed, "services_alive_after_down": survivors,
        "matmul_gflops_fp32": {"before": round(peak_before, 1), "after": round(matmul_gflops(), 1)},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "command": " ".join(["python", "benchmarks/load_test.py", "--backend", backend, "--runs", str(runs),
                             "--timeout", str(int(timeout))]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), required=True)
    parser.add_argument("--runs", type=int, default=8, help="deployment runs submitted at once (default 8)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the runs (default 1800)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "load")
    parser.add_argument("--keep-logs", action="store_true", help="copy the services' logs to <out>/<backend>-logs/")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    data_source = os.environ.get("DIFFUSION_DATA_SOURCE", "")
    if not (Path(data_source) / "train-images-idx3-ubyte.gz").is_file():
        parser.error(f"DIFFUSION_DATA_SOURCE={data_source!r} is not a folder of the MNIST raw .gz files: set it to one")
    args.out.mkdir(parents=True, exist_ok=True)
    result = load_test(args.backend, args.runs, args.timeout, data_source, args.out if args.keep_logs else None)
    text = json.dumps(result, indent=2)
    (args.out / f"{args.backend}.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
