"""Checkpoints: safetensors for tensors, JSON for everything else. Nothing is ever unpickled.

Two kinds:
  - the training checkpoint, one file `checkpoints/last.safetensors` holding the model, the EMA, the
    optimizer state and the RNG states (tensor names prefixed `model.`, `ema.`, `optim.`, `rng.`) with
    the config and scalar state as JSON in the file's metadata: the step, the step this run started at
    (0, or the step of the model it continues), its learning-rate plan and the dataset version. Replaced atomically (temp + rename),
    so a kill mid-write leaves the previous checkpoint valid.
  - the exported model, a folder with `model.safetensors` (the EMA weights) and `config.json`: what
    sampling, evaluation and the model registry use.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, atomic_write_text, temporary_name
from .config import Config, config_from_dict
from .denoiser import Denoiser
from .schedule import NoiseSchedule
from .unet import UNet

TRAINING_FORMAT = "diffusion-training-checkpoint-v1"
MODEL_FORMAT = "diffusion-model-v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, not safetensors, or does not match the config; or the reports
    (metrics.jsonl) a run resumes with are damaged."""


def _state_dict_tensors(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in state.items()}


def _take(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}). Checkpoints are never unpickled; "
            "point at a checkpoint written by this project."
        ) from exc


@dataclass
class TrainingState:
    step: int
    config: dict[str, Any]
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    ema_updates: int
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    dataset_sha256: str | None  # None in checkpoints written before it was recorded
    start_step: int = 0  # the step this run began at: 0, or the step of the trained model it continues
    lr_plan: dict[str, Any] | None = None  # train.LearningRatePlan fields; None in checkpoints written before it


def save_training_checkpoint(path: str | Path, *, step: int, config: Config, model: torch.nn.Module,
                             ema_model: torch.nn.Module, ema_updates: int, optimizer: torch.optim.Optimizer,
                             rng: dict[str, torch.Tensor], dataset_sha256: str, start_step: int = 0,
                             lr_plan: dict[str, Any] | None = None) -> Path:
    opt_state = optimizer.state_dict()
    tensors = {
        **_state_dict_tensors("model.", model.state_dict()),
        **_state_dict_tensors("ema.", ema_model.state_dict()),
        **_state_dict_tensors("rng.", rng),
    }
    for index, per_param in opt_state["state"].items():
        tensors.update(_state_dict_tensors(f"optim.{index}.", per_param))
    meta = {
        "format": TRAINING_FORMAT,
        "step": str(step),
        "ema_updates": str(ema_updates),
        "config": json.dumps(config.to_dict()),
        "dataset_sha256": dataset_sha256,
        "optimizer_param_groups": json.dumps(opt_state["param_groups"]),
        "start_step": str(start_step),
        **({"lr_plan": json.dumps(lr_plan)} if lr_plan is not None else {}),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_training_checkpoint(path: str | Path) -> TrainingState:
    path = Path(path)
    tensors, meta = _read_safetensors(path)
    if meta.get("format") != TRAINING_FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint (format {meta.get('format')!r})")
    optim_tensors = _take(tensors, "optim.")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in optim_tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return TrainingState(
        step=int(meta["step"]),
        config=json.loads(meta["config"]),
        model=_take(tensors, "model."),
        ema=_take(tensors, "ema."),
        ema_updates=int(meta["ema_updates"]),
        optimizer={"state": state, "param_groups": json.loads(meta["optimizer_param_groups"])},
        rng=_take(tensors, "rng."),
        dataset_sha256=meta.get("dataset_sha256"),
        start_step=int(meta.get("start_step", 0)),
        lr_plan=json.loads(meta["lr_plan"]) if "lr_plan" in meta else None,
    )


def export_model(directory: str | Path, model: torch.nn.Module, config: Config,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` + `config.json` into `directory`, replacing it as a whole."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_name(directory)
    staging.mkdir()
    try:
        with atomic_path(staging / WEIGHTS_FILE) as tmp:
            save_file(_state_dict_tensors("", model.state_dict()), str(tmp), metadata={"format": MODEL_FORMAT})
        document = {"format": MODEL_FORMAT, "config": config.to_dict(), **(extra or {})}
        atomic_write_text(staging / CONFIG_FILE, json.dumps(document, indent=2))
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(staging, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


@dataclass
class LoadedModel:
    denoiser: Denoiser
    config: Config
    info: dict[str, Any]

    @property
    def net(self) -> UNet:
        return self.denoiser.net


def build_denoiser(config: Config) -> Denoiser:
    schedule = NoiseSchedule(config.diffusion.timesteps, config.diffusion.schedule)
    return Denoiser(UNet(config.model), schedule, config.diffusion.prediction,
                    loss_weighting=config.train.loss_weighting, min_snr_gamma=config.train.min_snr_gamma)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """The EMA model from an exported folder, a run folder, or a training checkpoint file."""
    path = Path(path)
    if path.is_dir() and (path / "model" / CONFIG_FILE).is_file():
        path = path / "model"
    if path.is_dir() and not (path / CONFIG_FILE).is_file() and (path / "checkpoints" / "last.safetensors").is_file():
        path = path / "checkpoints" / "last.safetensors"
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{path} holds no {WEIGHTS_FILE} + {CONFIG_FILE}; point at an exported model folder")
        try:
            document = json.loads((path / CONFIG_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from exc
        if document.get("format") != MODEL_FORMAT:
            raise CheckpointError(f"{path / CONFIG_FILE} is not a model description (format {document.get('format')!r})")
        weights, _ = _read_safetensors(path / WEIGHTS_FILE)
        config_dict = document["config"]
        info = {k: v for k, v in document.items() if k not in ("config", "format")}
    elif path.is_file():
        state = load_training_checkpoint(path)
        weights, config_dict, info = state.ema, state.config, {"step": state.step}
    else:
        raise CheckpointError(f"no checkpoint at {path}")
    config = config_from_dict(config_dict)
    denoiser = build_denoiser(config)
    try:
        denoiser.net.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {path} do not fit the model its config describes: {exc}") from exc
    denoiser.to(device).eval()
    return LoadedModel(denoiser, config, info)
