"""sample: images from a registered model with the config's own sampler (`sample.sampler`, its steps, η
and spacing: the primary setting, whose FID decides the champion) and with DDPM (all T steps).

The primary setting draws `evaluation.num_samples` images (the evaluation budget, 1,000 in mnist-cpu);
every other setting draws `sample.num_samples` (the pictures and the side-by-side comparisons). The
other sampling settings are the run's `sample.*` config (steps, eta, spacing, batch_size, clip_x0,
seed). A class-conditional model is sampled for labels in the class mix of the split FID is computed
against (diffusion_core.evaluation.protocol.scoring_labels) at the config's guidance weight, and with
the primary sampler also at every weight of `sample.guidance_sweep`. With `sample.nfe_sweep` set, DDIM
and DPM-Solver++(2M) (ODE and SDE) also run at each of those step counts (FID against network
evaluations). Per setting, tagged like the evaluation keys (`ddpm1000`, `ddim50`,
conditional `ddim50_w3`), the run gets `samples/<tag>.safetensors` (all images, uint8 [N, C, H, W], and
their `labels` when conditional), `samples/<tag>.png` (a grid of the first 64; conditional: one row per
class) and the metric `sampling_images_per_s_<tag>`.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from prefect import flow, get_run_logger
from safetensors.torch import save_file

from diffusion_core.config import Config, SampleConfig, config_from_dict
from diffusion_core.data import get_spec, prepare_dataset
from diffusion_core.distributed import DistContext, resolve_device
from diffusion_core.evaluation.evaluator import sampler_tag
from diffusion_core.evaluation.protocol import REFERENCE_SPLIT, primary_settings, sampling_settings, scoring_labels
from diffusion_core.images import grid_by_class, save_grid
from diffusion_core.samplers import generate_batches

from .registry import load_registered_model
from .tracking import log_metrics, upload_artifacts

SAMPLES_ARTIFACT = "samples"
GRID_MAX = 64


@dataclass(frozen=True)
class SamplerSetting:
    """One way the pipeline samples a model: the sampling settings (steps and spacing resolved) and
    whether the model is class-conditional (which puts the guidance weight into the tag)."""

    settings: SampleConfig
    conditional: bool

    @property
    def guidance(self) -> float | None:
        return self.settings.guidance if self.conditional else None

    @property
    def tag(self) -> str:
        """The name used in artifact names and evaluation metric keys, e.g. `ddim50`, `ddim50_w3`."""
        return sampler_tag(self.settings.sampler, self.settings.steps, self.guidance)

    @property
    def protocol(self) -> str:
        """Everything that changes the samples' distribution, e.g. `ddim50-eta0-linear`, `consistency4-log_snr`,
        with levels_log_snr `consistency4-levels-4.5,-1.5,0.5`, with an SDE noise other than 1
        `dpmpp2msde20-noise2-log_snr`; a conditional model's ends in the class mix of its labels, `-testmix`
        (the reference split's)."""
        s = self.settings
        labels = f"-{REFERENCE_SPLIT}mix" if self.conditional else ""
        grid = "levels" + ",".join(f"{level:g}" for level in s.levels_log_snr) if s.levels_log_snr else s.spacing
        if s.sampler == "ddim":
            return f"{self.tag}-eta{s.eta:g}-{grid}{labels}"
        noise = f"-noise{s.sde_noise:g}" if s.sde_noise != 1 else ""
        return f"{self.tag}{noise}-{grid}{labels}"


def _setting(config: Config, **changes) -> SamplerSetting:
    """The config's sample settings with `changes`; no guidance for an unconditional model."""
    return SamplerSetting(sampling_settings(config, **changes), config.conditional)


def primary_setting(config: Config) -> SamplerSetting:
    """The config's own sampler, steps, η and spacing (the preset's choice, from the recipe ablation in
    docs/training-recipe.md) with the evaluation budget of images: the setting whose FID decides the
    champion, and what `diffusion evaluate --model DIR` scores without flags (both are `primary_settings`)."""
    return SamplerSetting(primary_settings(config), config.conditional)


def sampler_settings(config: Config) -> list[SamplerSetting]:
    """The primary setting, DDPM (all T steps), for a conditional model the primary sampler at each
    guidance_sweep weight, and DDIM and DPM-Solver++(2M) in ODE and SDE form (default spacing) at each
    nfe_sweep step count. Where two share a tag the one listed first is kept (the primary always)."""
    settings = [primary_setting(config), _setting(config, sampler="ddpm", steps=None, spacing=None)]
    if config.conditional:
        settings += [_setting(config, guidance=w) for w in config.sample.guidance_sweep]
    for steps in config.sample.nfe_sweep:
        settings += [_setting(config, sampler="ddim", steps=steps),
                     _setting(config, sampler="dpm++2m", steps=steps, spacing=None),
                     _setting(config, sampler="dpm++2m-sde", steps=steps, spacing=None)]
    by_tag: dict[str, SamplerSetting] = {}
    for setting in settings:  # one setting per tag: the first one listed wins
        by_tag.setdefault(setting.tag, setting)
    return list(by_tag.values())


@flow(name="sample")
def sample_images(run_id: str, model_uri: str, config: dict[str, Any], only_primary: bool = False) -> None:
    """Sample the model at `model_uri` with each setting of the run's `config` (as submitted; only the
    primary setting if `only_primary`: a re-score); log images and speed to the run."""
    logger = get_run_logger()
    client = MlflowClient()
    config = config_from_dict(config)
    device = resolve_device(config.train.device, DistContext())
    model = load_registered_model(model_uri, device)
    spec = get_spec(config.data.dataset)
    prepared = prepare_dataset(config.data.dataset, config.data.source, config.data.data_dir) if config.conditional else None
    speeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in [primary_setting(config)] if only_primary else sampler_settings(config):
            s = setting.settings
            labels = None if prepared is None else scoring_labels(prepared, REFERENCE_SPLIT, config.model.num_classes,
                                                                  s.num_samples, s.seed)
            start = time.perf_counter()
            images = torch.cat(list(generate_batches(
                model.denoiser, model.denoiser.schedule, (spec.channels, spec.image_size, spec.image_size),
                setting.settings, device=device, progress=False, class_labels=labels)))
            speeds[f"sampling_images_per_s_{setting.tag}"] = len(images) / (time.perf_counter() - start)
            tensors = {"images": images} if labels is None else {"images": images, "labels": labels}
            save_file(tensors, str(Path(tmp) / f"{setting.tag}.safetensors"),
                      metadata={"model": model_uri, "protocol": setting.protocol, "seed": str(s.seed)})
            grid_images, per_row = grid_by_class(images, labels, GRID_MAX)
            save_grid(grid_images, Path(tmp) / f"{setting.tag}.png", nrow=per_row)
            logger.info("%s: %d images at %.1f images/s", setting.protocol, len(images),
                        speeds[f"sampling_images_per_s_{setting.tag}"])
        upload_artifacts(client, run_id, tmp, SAMPLES_ARTIFACT)
    log_metrics(client, run_id, speeds)
