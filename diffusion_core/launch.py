"""Launch training under torchrun: one process per GPU (or N CPU processes with gloo), on one node
or several (c10d rendezvous), as a subprocess in its own process group so that stopping the caller
stops every rank.

Ranks get only the environment training needs (rank_environment), never the launcher's credentials:
the launcher prepares the dataset first (prepare_for_ranks), so ranks read it from data.data_dir and
never reach the data source's storage.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .atomic import atomic_write_text
from .config import Config, ConfigError
from .data import prepare_dataset

# Environment for every rank (allocator and thread tuning happen in-process: diffusion_core.runtime).
RANK_ENV = {"PYTHONUNBUFFERED": "1"}
# What ranks inherit from the launcher: the system (paths, locale, temporary folder, proxies, certificates),
# Python, the accelerator, collective and math libraries, torch, the project's settings and MLflow's (the
# tracking URI and run id of the metrics thread: diffusion_core.tracking); nothing else. Names are compared
# in upper case.
RANK_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "TEMP", "TMP",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE", "PYTHONPATH", "PYTHONHOME", "PYTHONHASHSEED", "PYTHONWARNINGS", "VIRTUAL_ENV",
    "LD_LIBRARY_PATH", "DO_NOT_TRACK", "MPLBACKEND", "MPLCONFIGDIR",
})
RANK_ENV_PREFIXES = ("LC_", "XDG_", "CUDA_", "NVIDIA_", "NCCL_", "GLOO_", "OMP_", "MKL_", "KMP_", "TORCH",
                     "PYTORCH_", "TRITON_", "MLFLOW_", "DIFFUSION_")
# Whatever passes the list above is still withheld when its name marks a secret …
SECRET_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "AUTH")
# … except the one credential a rank uses: rank 0's metrics thread logs to an authenticated tracking server.
RANK_CREDENTIALS = frozenset({"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"})


def resolve_nproc(nproc_per_node: int | str) -> int:
    """'auto' → the number of visible GPUs, or 1 on a CPU-only machine."""
    if nproc_per_node == "auto":
        return max(1, torch.cuda.device_count())
    try:
        n = int(nproc_per_node)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ConfigError(f"nproc_per_node must be a positive integer or 'auto', got {nproc_per_node!r}")
    return n


def torchrun_command(config_file: Path, run_dir: Path, nproc_per_node: int | str, *, nnodes: int = 1,
                     node_rank: int = 0, rdzv_endpoint: str | None = None, rdzv_id: str = "diffusion",
                     resume: bool = True, log_dir: Path | None = None, continue_from: Path | str | None = None,
                     allow_new_data: bool = False) -> list[str]:
    """The torchrun command line. One node: `--standalone`. Several: c10d rendezvous at `rdzv_endpoint`
    (host:port of node 0), the same command on every node with its own `node_rank`. With `log_dir`,
    each rank's output is also kept in a file there and printed whole lines at a time, tagged `[rankN]:`."""
    nproc = resolve_nproc(nproc_per_node)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--max-restarts=0"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        if not rdzv_endpoint:
            raise ConfigError("several nodes need rdzv_endpoint=host:port of the first node")
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    if log_dir is not None:
        cmd += [f"--log-dir={log_dir}", "--tee=3", "--log-line-prefix-template=[rank${rank}]: "]
    cmd += ["-m", "diffusion_core.cli", "train", "--preset", str(config_file), "--run-dir", str(run_dir)]
    if not resume:
        cmd.append("--no-resume")
    if continue_from is not None:
        cmd += ["--continue-from", str(continue_from)]
    if allow_new_data:
        cmd.append("--allow-new-data")
    return cmd


def rank_environment(nproc: int) -> dict[str, str]:
    """The environment of torchrun and its `nproc` ranks: this process's variables that training needs
    (RANK_ENV_NAMES, RANK_ENV_PREFIXES) less any secret (SECRET_MARKERS), plus RANK_ENV and a thread count."""
    env = {name: value for name, value in os.environ.items() if rank_may_see(name)}
    env.update(RANK_ENV)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def rank_may_see(name: str) -> bool:
    upper = name.upper()
    if upper in RANK_CREDENTIALS:
        return True
    needed = upper in RANK_ENV_NAMES or upper.startswith(RANK_ENV_PREFIXES)
    return needed and not any(marker in upper for marker in SECRET_MARKERS)


def prepare_for_ranks(config: Config) -> None:
    """Fetch, verify and convert the dataset here, with this process's storage credentials, so that the
    ranks (which get none) find it prepared in data.data_dir."""
    prepare_dataset(config.data.dataset, config.data.source, config.data.data_dir)


def write_resolved_config(config: Config, run_dir: Path) -> Path:
    """The fully resolved config as JSON in the run folder: what every rank (and MLflow) reads."""
    return atomic_write_text(run_dir / "config.json", json.dumps(config.to_dict(), indent=2))


def run_process_group(cmd: list[str], env: dict[str, str], on_line: Callable[[str], None] = print,
                      tail_lines: int = 60) -> tuple[int, list[str]]:
    """Run `cmd` in a new session, streaming merged stdout/stderr lines to `on_line`.

    Returns (exit code, last lines). If the caller is interrupted (Ctrl-C, a cancelled flow run),
    the whole process group is terminated, then killed: no orphaned ranks.
    """
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            on_line(line)
        return proc.wait(), list(tail)
    except BaseException:
        terminate_group(proc)
        raise


def terminate_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def launch_training(config: Config, run_dir: Path, nproc_per_node: int | str, *, resume: bool = True,
                    on_line: Callable[[str], None] = print, **options) -> int:
    """Prepare the dataset, write the resolved config, run torchrun, return its exit code."""
    run_dir.mkdir(parents=True, exist_ok=True)
    prepare_for_ranks(config)
    config_file = write_resolved_config(config, run_dir)
    cmd = torchrun_command(config_file, run_dir, nproc_per_node, resume=resume, **options)
    code, _ = run_process_group(cmd, rank_environment(resolve_nproc(nproc_per_node)), on_line)
    return code
