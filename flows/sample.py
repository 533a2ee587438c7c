"""sample: N images from a registered model with DDPM (all T steps) and with DDIM (the config's steps and η).

The sampling settings are the run's `sample.*` config (num_samples, steps, eta, spacing, batch_size,
clip_x0, seed). A class-conditional model is sampled with balanced class labels (0…K−1 in turn) at
the config's guidance weight, and with DDIM also at every weight of `sample.guidance_sweep`. With
`sample.nfe_sweep` set, DDIM and DPM-Solver++(2M) (ODE and SDE) also run at each of those step counts (FID against
network evaluations).
Per setting, tagged like the evaluation keys (`ddpm1000`, `ddim50`, conditional `ddim50_w3`), the
run gets `samples/<tag>.safetensors` (all images, uint8 [N, C, H, W], and their `labels` when
conditional), `samples/<tag>.png` (a grid of the first 64; conditional: one row per class) and the
metric `sampling_images_per_s_<tag>`.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow import MlflowClient
from prefect import flow, get_run_logger
from safetensors.torch import save_file

from diffusion_core.config import Config
from diffusion_core.data import get_spec
from diffusion_core.distributed import DistContext, resolve_device
from diffusion_core.evaluation.evaluator import sampler_tag
from diffusion_core.images import grid_by_class, save_grid
from diffusion_core.guidance import balanced_labels
from diffusion_core.samplers import generate_batches

from .registry import load_registered_model
from .tracking import log_metrics, run_config, upload_artifacts

SAMPLES_ARTIFACT = "samples"
GRID_MAX = 64


@dataclass(frozen=True)
class SamplerSetting:
    sampler: str
    steps: int
    eta: float
    spacing: str
    guidance: float | None = None  # classifier-free guidance weight; None for an unconditional model

    @property
    def tag(self) -> str:
        """The name used in artifact names and evaluation metric keys, e.g. `ddim50`, `ddim50_w3`."""
        return sampler_tag(self.sampler, self.steps, self.guidance)

    @property
    def protocol(self) -> str:
        """Everything that changes the samples' distribution, e.g. `ddim50-eta0-linear`."""
        return self.tag if self.sampler == "ddpm" else f"{self.tag}-eta{self.eta:g}-{self.spacing}"


def primary_setting(config: Config) -> SamplerSetting:
    """DDIM as the config sets it: the setting whose FID decides the champion."""
    s = config.sample
    return SamplerSetting("ddim", s.steps, s.eta, s.spacing, s.guidance if config.conditional else None)


def sampler_settings(config: Config) -> list[SamplerSetting]:
    """DDPM, the primary DDIM setting, for a conditional model DDIM at each guidance_sweep weight, and
    DDIM and DPM-Solver++(2M) in ODE and SDE form (log-SNR spacing) at each nfe_sweep step count."""
    primary = primary_setting(config)
    settings = [SamplerSetting("ddpm", config.diffusion.timesteps, 1.0, "linear", primary.guidance), primary]
    if config.conditional:
        settings += [dataclasses.replace(primary, guidance=w) for w in config.sample.guidance_sweep]
    for steps in config.sample.nfe_sweep:
        settings += [dataclasses.replace(primary, steps=steps),
                     SamplerSetting("dpm++2m", steps, 0.0, "log_snr", primary.guidance),
                     SamplerSetting("dpm++2m-sde", steps, 0.0, "log_snr", primary.guidance)]
    by_tag: dict[str, SamplerSetting] = {}
    for setting in settings:  # one setting per tag: the first one listed wins
        by_tag.setdefault(setting.tag, setting)
    return list(by_tag.values())


@flow(name="sample")
def sample_images(run_id: str, model_uri: str) -> None:
    """Sample the model at `model_uri` with each setting of the run's config; log images and speed."""
    logger = get_run_logger()
    client = MlflowClient()
    config = run_config(client, run_id)
    device = resolve_device(config.train.device, DistContext())
    model = load_registered_model(model_uri, device)
    spec = get_spec(config.data.dataset)
    s = config.sample
    labels = balanced_labels(s.num_samples, config.model.num_classes) if config.conditional else None
    speeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in sampler_settings(config):
            start = time.perf_counter()
            images = torch.cat(list(generate_batches(
                model.denoiser, model.denoiser.schedule, (spec.channels, spec.image_size, spec.image_size),
                s.num_samples, batch_size=s.batch_size, seed=s.seed, device=device, progress=False,
                sampler=setting.sampler, steps=setting.steps, eta=setting.eta, spacing=setting.spacing,
                clip_x0=s.clip_x0, class_labels=labels, guidance=setting.guidance or 0.0)))
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
