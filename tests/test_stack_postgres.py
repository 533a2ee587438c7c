"""infra/stack.sh with STACK_DB=postgres, for real: the stack's own PostgreSQL server (Debian's postgresql
package), the MLflow and Prefect servers keeping their data in it, read back with psycopg2; the password
only where it is used; `down` leaves no process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path

import psycopg2
import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
STACK = str(REPO / "infra" / "stack.sh")
SERVICES = ("postgres", "s3", "mlflow", "prefect", "serve")
PASSWORD = "pg-" + uuid.uuid4().hex  # never written anywhere, never on a command line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stack(env: dict[str, str], command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([STACK, command], env=env, capture_output=True, text=True, timeout=timeout)


def _alive(leader: int) -> bool:
    try:
        os.killpg(leader, 0)
        return True
    except ProcessLookupError:
        return False


def _group_environments(leader: int) -> list[str]:
    """The raw environment of every process in the process group `leader` leads."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == leader:
                found.append((stat.parent / "environ").read_bytes().decode(errors="replace"))
        except (OSError, IndexError, ValueError):  # exited meanwhile, or another user's
            pass
    return found


@pytest.fixture()
def pg_stack(mnist_raw_source):
    """Settings for a postgres-backed stack in a fresh folder that the server's user can enter (pytest's
    own temporary folders are private to this user); everything started is killed whatever happens."""
    root = Path(tempfile.mkdtemp(prefix="stack-pg-"))
    root.chmod(0o711)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env.update({f"STACK_{name}_PORT": str(_free_port()) for name in ("S3", "MLFLOW", "PREFECT", "POSTGRES")})
    env.update({"STACK_DB": "postgres", "STACK_POSTGRES_PASSWORD": PASSWORD, "STACK_DIR": str(root / "state"),
                "STACK_ENV_FILE": str(root / "absent.env"), "STACK_TIMEOUT": "300", "PYTHON": sys.executable,
                "DIFFUSION_DATA_SOURCE": str(mnist_raw_source), "PREFECT_HOME": str(root / "prefect-client")})
    yield env, root / "state"
    for pid_file in (root / "state" / "pids").glob("*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(root, ignore_errors=True)


def _query(env: dict[str, str], database: str, sql: str) -> list[tuple]:
    with psycopg2.connect(host="127.0.0.1", port=int(env["STACK_POSTGRES_PORT"]), user="stack", password=PASSWORD,
                          dbname=database) as connection, connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def test_mlflow_and_prefect_keep_their_data_in_the_stacks_postgres(pg_stack):
    env, state = pg_stack
    up = _stack(env, "up")
    assert up.returncode == 0, up.stdout + up.stderr
    client = dict(line.removeprefix("export ").split("=", 1) for line in _stack(env, "env").stdout.splitlines())

    with urllib.request.urlopen(client["PREFECT_API_URL"] + "/health", timeout=30) as response:
        assert response.read() == b"true"
    # The serve process registered its deployments through the Prefect API: they are rows in PostgreSQL.
    assert {"nightly", "adhoc", "champion", "few-step"} <= {name for (name,) in _query(env, "prefect", "SELECT name FROM deployment")}
    name = f"pg-roundtrip-{uuid.uuid4().hex[:8]}"
    experiment_id = MlflowClient(client["MLFLOW_TRACKING_URI"]).create_experiment(name)
    assert _query(env, "mlflow", f"SELECT experiment_id FROM experiments WHERE name = '{name}'") == [(int(experiment_id),)]
    assert not list(state.rglob("*.db")), "a SQLite file was created"  # neither server fell back to SQLite

    status = _stack(env, "status", timeout=60)
    assert status.returncode == 0 and "postgres: healthy" in status.stdout, status.stdout
    # The password reaches exactly the processes that connect, never a command line or a file.
    leaders = {name: int((state / "pids" / f"{name}.pid").read_text()) for name in SERVICES}
    holds = {name: any(PASSWORD in found for found in _group_environments(pid)) for name, pid in leaders.items()}
    assert holds == {"postgres": False, "s3": False, "mlflow": True, "prefect": True, "serve": False}
    command_lines = [p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists()]
    assert not any(PASSWORD.encode() in line for line in command_lines)

    down = _stack(env, "down", timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert [name for name, pid in leaders.items() if _alive(pid)] == []
    assert [str(p) for p in state.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()] == []


def test_an_unknown_backend_is_refused_before_anything_starts(pg_stack):
    env, state = pg_stack
    refused = _stack({**env, "STACK_DB": "mysql"}, "up", timeout=60)
    assert refused.returncode == 2 and "STACK_DB=mysql: expected sqlite (the default) or postgres" in refused.stderr
    assert not (state / "pids").exists() or not list((state / "pids").iterdir())
