"""A non-editable install (the project's wheel in a fresh virtual environment) is a complete program:
the presets and the shipped classifier come with the package, nothing is read from a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
NOT_SOURCE = shutil.ignore_patterns(".git", ".cache", "runs", "data", "mlruns", "mlflow.db", ".state", "build",
                                   "*.egg-info", "__pycache__", ".pytest_cache")


def test_non_editable_install_trains_a_preset_outside_the_checkout(smoke_overrides, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    # the wheel is built by this interpreter's setuptools (the dev extra's), offline ...
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", "wheels", source,
         cwd=tmp_path)
    shutil.rmtree(source)  # nothing may come from the source tree any more
    # ... and installed into a fresh environment whose dependencies are this interpreter's packages (a .pth
    # file names its site-packages: their own .pth files, such as an editable install of the project, are not run)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    env_site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                         cwd=tmp_path).strip())
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (env_site / "dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    _run(*pip, "--python", python, "install", "--no-deps", "--no-index", "--ignore-installed",
         next((tmp_path / "wheels").glob("diffusion_pipeline-*.whl")), cwd=tmp_path)

    where = _run(python, "-c", "import diffusion_core; print(diffusion_core.__file__)", cwd=tmp_path)
    assert Path(where.strip()).is_relative_to(env_dir), where
    args = [str(env_dir / "bin" / "diffusion"), "train", "--preset", "smoke", "--run-dir", str(tmp_path / "run")]
    for key, value in smoke_overrides.items():
        args += ["--set", f"{key}={value}"]
    assert "trained to step 20" in _run(*args, cwd=tmp_path)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def _run(*args, cwd: Path, timeout: float = 600) -> str:
    """Run a command in `cwd` outside the checkout's environment (no PYTHONPATH, no active virtual
    environment); its stdout, or a failure showing its stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.parametrize("missing", ["moto", "curl"])
def test_stack_names_its_missing_requirement_before_starting_anything(tmp_path, missing):
    """The stack's requirements are an extra ([stack]) plus curl; without one, `up` says which and starts nothing."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("moto[server]") for req in extras["stack"])
    env = {**os.environ, "STACK_DIR": str(tmp_path / "state"), "STACK_ENV_FILE": str(tmp_path / "absent.env"),
           "STACK_TIMEOUT": "5", "STACK_S3_PORT": "1"}  # if it did start something: fail fast
    if missing == "moto":
        venv.create(tmp_path / "bare", with_pip=False)  # an interpreter without the project's packages
        env["PYTHON"] = str(tmp_path / "bare" / "bin" / "python")
    else:
        bin_dir = tmp_path / "bin"  # bash and python, but no curl, on PATH
        bin_dir.mkdir()
        for tool in ("bash", "env", "setsid", "cat", "mkdir", "dirname", "seq", "sleep", "tail", "rm"):
            if shutil.which(tool):
                (bin_dir / tool).symlink_to(shutil.which(tool))
        env.update(PATH=str(bin_dir), PYTHON=sys.executable)
    done = subprocess.run([str(REPO / "infra" / "stack.sh"), "up"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert ("pip install -e '.[stack]'" if missing == "moto" else "needs curl") in done.stderr, done.stderr
    assert not list((tmp_path / "state" / "pids").glob("*.pid"))
