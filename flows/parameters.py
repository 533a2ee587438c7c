"""What a train-eval (or sample-model) run may be asked to do through its parameters.

Whoever can reach the Prefect API can start a deployment run with any parameters, so they are an
interface to the worker. Overrides are first normalised to dotted keys (`{"train": {"steps": 5}}` is
`{"train.steps": 5}`: one setting, the preset's other train settings kept), then checked in that final
form: a run may change training, sampling and scoring settings (model, diffusion, train, sample,
evaluation sections, and the dataset by name), every setting that sizes time or memory within the
bounds below. Paths, data sources and endpoints come from the worker's environment
(DIFFUSION_DATA_SOURCE, DIFFUSION_DATA_DIR, …), process-level switches (PROCESS_KEYS) from the
worker's own configuration, never from a run. `preset` names a shipped preset, or a .toml file under
the folder $DIFFUSION_PRESET_DIR names. A distillation run (distill-eval, train-distill's `distill_overrides`)
may set its student's distill.*, sample.* and evaluation.* settings, bounded alike: the student takes its teacher's
model, diffusion, train and data settings. Anything else is refused before any work, naming the key and what is
allowed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusion_core.config import MIN_SCORED_IMAGES, PRESET_DIR, ConfigError

PRESET_DIR_ENV = "DIFFUSION_PRESET_DIR"
RUN_SECTIONS = ("model", "diffusion", "train", "sample", "evaluation")  # what a training run may set
RUN_KEYS = ("data.dataset", "name")
DISTILL_SECTIONS = ("distill", "sample", "evaluation")  # what a distillation run may set for its student
# Switches of the worker process, not of the model: where it computes and whether Inductor writes its cache.
PROCESS_KEYS = ("train.compile", "train.device")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Integer settings that size time or memory: (smallest, largest) a run may ask for.
BOUNDS = {
    "train.steps": (1, 1_000_000), "train.batch_size": (1, 1024),
    "diffusion.timesteps": (2, 4000),                     # DDPM sampling runs all T steps
    "model.base_channels": (4, 256), "model.num_res_blocks": (1, 4), "model.attention_heads": (1, 16),
    "model.patch_size": (1, 8),                           # the input layer's channels grow with its square
    "sample.num_samples": (MIN_SCORED_IMAGES, 50_000), "sample.batch_size": (1, 4096), "sample.steps": (1, 4000),
    "evaluation.num_samples": (10, 50_000), "evaluation.bootstrap": (0, 10_000),
    "num_samples": (1, 50_000), "nproc_per_node": (1, os.cpu_count() or 1),
    "shard_size": (1, 4096),                              # images per network call of flows.sample_model
    "sample.seed": (0, 2**32 - 1),                        # batch k's generator is seeded seed·1,000,003 + k
    "train.seed": (0, 2**32 - 1), "distill.seed": (0, 2**32 - 1),  # torch.manual_seed takes 64 bits: refused up front
    "distill.steps": (1, 1_000_000), "distill.batch_size": (1, 1024), "distill.log_every": (1, 1_000_000),
    "distill.ode_steps": (2, 4000), "distill.sample_steps": (1, 4000),  # teacher steps per schedule; student's steps
}
# List settings that size the work: (most entries, smallest entry, largest entry).
LIST_BOUNDS = {"model.channel_mults": (5, 1, 8), "model.attention_levels": (5, 0, 4),
               "sample.guidance_sweep": (16, 0, 100), "sample.nfe_sweep": (16, 1, 4000)}


def _refuse(key: str, why: str) -> ConfigError:
    return ConfigError(f"parameter {key} refused: {why}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bounded(key: str, value: Any) -> None:
    low, high = BOUNDS[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _refuse(key, f"must be an integer from {low} to {high}, got {value!r}")


def _bounded_list(key: str, value: Any) -> None:
    most, low, high = LIST_BOUNDS[key]
    if not isinstance(value, (list, tuple)) or len(value) > most or not all(
            _is_number(v) and low <= v <= high for v in value):
        raise _refuse(key, f"must be a list of at most {most} numbers from {low} to {high}, got {value!r}")


def normalise_overrides(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Overrides as dotted keys: section tables are expanded into one key per setting, so an override
    changes exactly the settings it names. A setting named twice (dotted and in a table) is refused."""
    if not isinstance(overrides, Mapping):
        raise _refuse(f"overrides[{prefix.rstrip('.') or 'overrides'!r}]",
                      f"must be a table of settings, got {overrides!r}")
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise _refuse(f"overrides[{key!r}]", "keys are setting names such as train.steps")
        dotted = f"{prefix}{key}"
        expanded = normalise_overrides(value, f"{dotted}.") if isinstance(value, Mapping) else {dotted: value}
        for name, leaf in expanded.items():
            if name in flat:
                raise _refuse(f"overrides[{name!r}]", "set twice (as a dotted key and inside a section table)")
            flat[name] = leaf
    return flat


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


def check_overrides(overrides: Mapping[str, Any], sections: tuple[str, ...] = RUN_SECTIONS,
                    keys: tuple[str, ...] = RUN_KEYS) -> dict[str, Any]:
    """The overrides as dotted keys (normalise_overrides), each one checked; refuses (ConfigError naming
    the key and what is allowed) anything a run may not set: settings outside `sections` and `keys`,
    process switches, values outside BOUNDS and LIST_BOUNDS."""
    flat = normalise_overrides(overrides)
    allowed = ", ".join([*(f"{section}.*" for section in sections), *keys])
    for key, value in flat.items():
        section = key.split(".", 1)[0]
        if "." not in key and key not in keys:
            raise _refuse(f"overrides[{key!r}]", "a section takes a table of settings ({\"train\": {\"steps\": 100}}) "
                          f"or dotted keys (train.steps), got {value!r}")
        if key in PROCESS_KEYS:
            raise _refuse(f"overrides[{key!r}]", "a switch of the worker process, set in the worker's preset or "
                          "environment, not by a run")
        if section not in sections and key not in keys:
            raise _refuse(f"overrides[{key!r}]", f"this run may set {allowed}; paths, data sources and endpoints "
                          "come from the worker's environment (DIFFUSION_DATA_SOURCE, DIFFUSION_DATA_DIR)")
        if key in BOUNDS:
            _bounded(key, value)
        if key in LIST_BOUNDS:
            _bounded_list(key, value)
        if key == "name" and not (isinstance(value, str) and NAME.fullmatch(value)):
            raise _refuse(key, f"must match {NAME.pattern}, got {value!r}")
    return flat


def check_distill_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A distillation run's student settings (DISTILL_SECTIONS), checked as `check_overrides` checks a training
    run's; returns them as dotted keys."""
    return check_overrides(overrides, DISTILL_SECTIONS, ())


def check_run_parameters(preset: str, overrides: Mapping[str, Any], nproc_per_node: int | str,
                         num_samples: int | None) -> tuple[str, dict[str, Any]]:
    """Refuse (ConfigError naming the key) what a run may not ask for; see the module docstring.
    Returns the preset to load and the overrides as checked dotted keys."""
    preset = check_preset(preset)
    flat = check_overrides(overrides)
    if nproc_per_node != "auto":
        _bounded("nproc_per_node", int(nproc_per_node) if str(nproc_per_node).isdigit() else nproc_per_node)
    if num_samples is not None:
        _bounded("num_samples", num_samples)
    return preset, flat


def check_sampling_parameters(num_samples: Any, shard_size: Any, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse (ConfigError naming the key) what a sampling run (flows.sample_model) may not ask for:
    `num_samples` or `shard_size` outside BOUNDS, or sample `settings` ({"steps": 50}) that
    check_overrides refuses as `sample.*` keys. Returns the settings as checked dotted keys."""
    _bounded("num_samples", num_samples)
    _bounded("shard_size", shard_size)
    return check_overrides({f"sample.{key}": value for key, value in settings.items()})
