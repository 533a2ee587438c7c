"""An exported model as an MLflow `python_function` model, with nothing pickled.

The MLflow model folder is the exported model itself (`model.safetensors` + `config.json`, as
checkpoint.export_model writes them) plus an `MLmodel` whose python_function flavor names this module
as its `loader_module`: `mlflow.pyfunc.load_model` imports it from the installed package and calls
`_load_pyfunc(folder)`. No code and no pickle is read from the artifact store. Its pip requirements are
this package at its installed version and its torch pin, written out (never inferred).

A request is a DataFrame column `class` (one row per class asked for; each row gives `n` images of its
class, in row order) or no class column at all (`n` images without a class: an unconditional model's
samples, or a conditional model's unconditional mode ε̂(x, ∅)). Inference params: `n`, `sampler`,
`steps`, `guidance` and `seed`, whose defaults are the model's own sampling settings (`sample.*` of its
config: the sampler, steps and guidance its FID was measured with; n = 1). `steps` keeps its value when
another sampler is asked for; the spacing is that sampler's default then, as in `diffusion sample`.
The answer is uint8 images [N, C, H, W] with N = rows · n ≤ MAX_IMAGES, bit-equal to
`diffusion sample --model FOLDER --class c1,c2,… -n N --sampler S --steps K --guidance W --seed X` on
the same device. A request that does not fit the model is refused with an MlflowException
INVALID_PARAMETER_VALUE (HTTP 400 from `mlflow models serve`) before any sampling.
"""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .checkpoint import CONFIG_FILE, MODEL_FORMAT, WEIGHTS_FILE, LoadedModel, load_model
from .config import Config, ConfigError, SampleConfig
from .data import get_spec
from .distributed import DistContext, resolve_device
from .samplers import SAMPLERS, generate_batches

DISTRIBUTION = "diffusion-pipeline"
CLASS_COLUMN = "class"
MAX_IMAGES = 256  # images per request: one network batch of the presets, ~1 MB of JSON for MNIST
MAX_SEED = 2**32 - 1


class DiffusionPyfunc:
    """What `mlflow.pyfunc.load_model` wraps: a loaded model that draws images for class requests."""

    def __init__(self, model: LoadedModel, device: torch.device) -> None:
        self.model, self.device = model, device
        self.defaults = default_params(model.config)

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        """uint8 images [N, C, H, W] for the class rows of `model_input` (see the module docstring)."""
        config = self.model.config
        settings, labels = request(config, model_input, {**self.defaults, **(params or {})})
        images = generate_batches(self.model.denoiser, self.model.denoiser.schedule, image_shape(config), settings,
                                  device=self.device, progress=False, class_labels=labels)
        return torch.cat(list(images)).numpy()


def _load_pyfunc(data_path: str) -> DiffusionPyfunc:
    """MLflow's entry point: the model in `data_path` (the MLflow model folder), on the GPU if there is one."""
    device = resolve_device("auto", DistContext())
    return DiffusionPyfunc(load_model(data_path, device), device)


def image_shape(config: Config) -> tuple[int, int, int]:
    size = get_spec(config.data.dataset).image_size
    return config.model.in_channels, size, size


def default_params(config: Config) -> dict[str, Any]:
    """The inference params' defaults: the model's own sampling settings, one image per row."""
    settings = config.sample.resolved(config.diffusion.timesteps)
    return {"n": 1, "sampler": settings.sampler, "steps": settings.steps,
            "guidance": float(settings.guidance) if config.conditional else 0.0, "seed": settings.seed}


def _refuse(message: str) -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def request(config: Config, model_input: Any, params: dict[str, Any]) -> tuple[SampleConfig, torch.Tensor | None]:
    """(sampling settings, class labels or None) for a request, or an MlflowException naming what does not
    fit the model and how to ask instead."""
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    n, sampler, steps, guidance, seed = (params[k] for k in ("n", "sampler", "steps", "guidance", "seed"))
    timesteps, num_classes = config.diffusion.timesteps, config.model.num_classes
    classes: list[int] | None = None
    if CLASS_COLUMN in frame.columns:
        column = frame[CLASS_COLUMN]
        if not config.conditional:
            raise _refuse("this model is unconditional (trained without classes): send no class column")
        if len(column) == 0:
            raise _refuse("the class column is empty: give one row per class to draw, or no class column "
                          "for images without a class")
        if column.isna().any() or not all(float(c).is_integer() for c in column):
            raise _refuse(f"class must be an integer in [0, {num_classes - 1}], got {column.tolist()}")
        classes = [int(c) for c in column]
        if not all(0 <= c < num_classes for c in classes):
            raise _refuse(f"unknown class in {classes}: this model has classes 0 to {num_classes - 1}")
    elif guidance:
        if guidance != default_params(config)["guidance"]:
            raise _refuse(f"guidance {guidance} needs classes to draw: send a class column, or guidance 0")
        guidance = 0.0  # the model's default weight, which a request without classes cannot use
    rows = len(classes) if classes else 1
    if not 1 <= int(n) <= MAX_IMAGES // rows:
        raise _refuse(f"n = {n} images per row for {rows} row(s): a request draws 1 to {MAX_IMAGES} images "
                      f"(n at most {MAX_IMAGES // rows} here); split larger requests")
    if sampler not in SAMPLERS:
        raise _refuse(f"sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    if not 1 <= int(steps) <= timesteps:
        raise _refuse(f"steps = {steps}: this model takes 1 to {timesteps} steps")
    if not 0 <= int(seed) <= MAX_SEED:
        raise _refuse(f"seed = {seed}: use an integer in [0, {MAX_SEED}]")
    try:
        settings = config.sample.override(sampler=sampler, steps=int(steps), guidance=float(guidance), seed=int(seed),
                                          num_samples=rows * int(n)).resolved(timesteps)
        config.check_sample(settings)
    except ConfigError as exc:
        raise _refuse(str(exc)) from exc
    labels = None if classes is None else torch.tensor(classes).repeat_interleave(int(n))
    return settings, labels


def signature(config: Config):
    """The model's MLflow signature: an optional integer column `class`, the inference params with the
    model's own defaults, and uint8 images [-1, C, H, W] out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

    defaults = default_params(config)
    types = {"n": DataType.long, "sampler": DataType.string, "steps": DataType.long, "guidance": DataType.double,
             "seed": DataType.long}
    return ModelSignature(inputs=Schema([ColSpec(DataType.long, CLASS_COLUMN, required=False)]),
                          outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape(config)))]),
                          params=ParamSchema([ParamSpec(key, types[key], defaults[key]) for key in types]))


def input_example(config: Config) -> pd.DataFrame:
    """Two classes (a conditional model) or one request without a class (an unconditional one)."""
    if config.conditional:
        return pd.DataFrame({CLASS_COLUMN: [0, min(1, config.model.num_classes - 1)]})
    return pd.DataFrame(index=[0])


def pip_requirements() -> list[str]:
    """This package at its installed version and the torch version it pins."""
    torch_pins = [r for r in metadata.requires(DISTRIBUTION) or [] if r.replace(" ", "").startswith("torch==")]
    return [f"{DISTRIBUTION}=={metadata.version(DISTRIBUTION)}", *torch_pins]


def save_pyfunc_model(path: str | Path, model_folder: str | Path, mlflow_model=None) -> Path:
    """Write the MLflow model for the exported model in `model_folder` into the new folder `path`: MLmodel
    (python_function flavor, loader_module this module, the signature and an input example), the pinned
    requirements, and the model's two files beside them."""
    import mlflow

    path, model_folder = Path(path), Path(model_folder)
    config = load_model(model_folder).config  # also checks that the folder is a loadable model
    mlflow.pyfunc.save_model(str(path), loader_module=__name__, mlflow_model=mlflow_model, signature=signature(config),
                             input_example=input_example(config), pip_requirements=pip_requirements(),
                             metadata={"format": MODEL_FORMAT})
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        shutil.copyfile(model_folder / name, path / name)
    description = mlflow.models.Model.load(str(path / "MLmodel"))
    description.model_size_bytes = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    description.save(str(path / "MLmodel"))
    return path

