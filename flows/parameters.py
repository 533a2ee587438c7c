"""What a train-eval run may be asked to do through its parameters.

Whoever can reach the Prefect API can start a deployment run with any parameters, so they are an
interface to the worker: a run may change training, sampling and scoring settings (model, diffusion,
train, sample, evaluation sections, and the dataset by name), within bounds where a value sizes the work. Paths, data
sources and endpoints come from the worker's environment (DIFFUSION_DATA_SOURCE,
DIFFUSION_DATA_DIR, …), never from a run. `preset` names a shipped preset, or a .toml file under
the folder $DIFFUSION_PRESET_DIR names. Anything else is refused before any work, naming the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from diffusion_core.config import PRESET_DIR, ConfigError

PRESET_DIR_ENV = "DIFFUSION_PRESET_DIR"
OVERRIDABLE_SECTIONS = ("model", "diffusion", "train", "sample", "evaluation")
OVERRIDABLE_KEYS = ("data.dataset", "name")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Integer settings that size the work: (smallest, largest) a run may ask for.
BOUNDS = {"train.steps": (1, 1_000_000), "sample.num_samples": (1, 50_000), "sample.batch_size": (1, 4096),
          "evaluation.num_samples": (10, 50_000), "evaluation.bootstrap": (0, 10_000),
          "num_samples": (1, 50_000), "nproc_per_node": (1, os.cpu_count() or 1)}
MAX_SWEEP = 16  # entries of sample.guidance_sweep / sample.nfe_sweep


def _refuse(key: str, why: str) -> ConfigError:
    return ConfigError(f"parameter {key} refused: {why}")


def _bounded(key: str, value: Any) -> None:
    low, high = BOUNDS[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _refuse(key, f"must be an integer from {low} to {high}, got {value!r}")


def check_preset(preset: str) -> str:
    """A shipped preset's name (returned as it is), or a .toml file inside $DIFFUSION_PRESET_DIR (its full path)."""
    if NAME.fullmatch(preset) and (PRESET_DIR / f"{preset}.toml").is_file():
        return preset
    allowed = os.environ.get(PRESET_DIR_ENV)
    shipped = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
    if allowed and preset.endswith(".toml"):
        path = Path(allowed, preset).resolve()
        if path.is_relative_to(Path(allowed).resolve()) and path.is_file():
            return str(path)
    where = f" or a .toml file under {PRESET_DIR_ENV} ({allowed})" if allowed else ""
    raise _refuse("preset", f"{preset!r} is not a shipped preset ({shipped}){where}")


def check_overrides(overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        section = key.split(".", 1)[0]
        if section not in OVERRIDABLE_SECTIONS and key not in OVERRIDABLE_KEYS:
            raise _refuse(f"overrides[{key!r}]", "a run may set model.*, diffusion.*, train.*, sample.*, evaluation.*, "
                          "data.dataset "
                          "and name; paths, data sources and endpoints come from the worker's environment "
                          "(DIFFUSION_DATA_SOURCE, DIFFUSION_DATA_DIR)")
        if key in BOUNDS:
            _bounded(key, value)
        if key in ("sample.guidance_sweep", "sample.nfe_sweep") and isinstance(value, list) and len(value) > MAX_SWEEP:
            raise _refuse(key, f"at most {MAX_SWEEP} entries, got {len(value)}")
        if key == "name" and not (isinstance(value, str) and NAME.fullmatch(value)):
            raise _refuse(key, f"must match {NAME.pattern}, got {value!r}")


def check_run_parameters(preset: str, overrides: dict[str, Any], nproc_per_node: int | str,
                         num_samples: int | None) -> str:
    """Refuse (ConfigError naming the key) what a run may not ask for; see the module docstring.
    Returns the preset to load."""
    preset = check_preset(preset)
    check_overrides(overrides)
    if nproc_per_node != "auto":
        _bounded("nproc_per_node", int(nproc_per_node) if str(nproc_per_node).isdigit() else nproc_per_node)
    if num_samples is not None:
        _bounded("num_samples", num_samples)
    return preset
