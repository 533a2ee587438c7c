"""Evaluate a model (or a tensor of samples) against the real data, and the floors to read it by.

Results are one flat dict. Metric keys are `<metric>_<extractor>_<tag>`, the tag naming how the
images were made: `ddim50`, `ddpm1000`, `dpmpp2m20` (sampler and steps), `samples` (a given tensor), `train`
(real train images: the best score reachable with N images) and `noise` (uniform random pixels: the
worst). Metrics: fid (and fid_std when bootstrapped), kid, kid_std, precision, recall, and with the lenet classifier also
confident_fraction and class_entropy; for class-conditional samples (tag `ddim50_w3`: guidance
weight 3) class_consistency and per-class FIDs. Context keys: extractor_id, num_samples, dataset,
dataset_sha256, reference_split, and for a model sampler, steps, eta, seed, sampling_images_per_s.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..checkpoint import LoadedModel
from ..config import MIN_SCORED_IMAGES, ConfigError, DataConfig, SampleConfig
from ..data import PreparedDataset, prepare_dataset
from ..distributed import DistContext, resolve_device
from ..samplers import generate_batches
from .classifier import class_statistics, predict_probs
from .extractors import Extractor, feature_network, resolve_extractor
from .metrics import compute_metrics, extract_features, fid_gap_bootstrap_std
from .protocol import REFERENCE_SPLIT, scoring_labels
from .reference import ReferenceSet, reference_set

TABLE_COLUMNS = ("fid", "fid_std", "kid", "precision", "recall", "confident_fraction", "class_entropy", "class_consistency")


def sampler_tag(sampler: str, steps: int, guidance: float | None = None) -> str:
    """'ddim', 50 → 'ddim50'; 'dpm++2m', 20 → 'dpmpp2m20'; 'dpm++2m-sde', 20 → 'dpmpp2msde20' (metric
    names may not hold '+'); a class-conditional protocol adds the guidance weight: 'ddim50_w3'."""
    return f"{sampler.replace('+', 'p').replace('-', '')}{steps}{guidance_suffix(guidance)}"


def guidance_suffix(guidance: float | None) -> str:
    """The tag suffix of a guidance weight: '' for an unconditional protocol, '_w3' for w = 3."""
    return "" if guidance is None else f"_w{guidance:g}"


PER_CLASS_MIN_IMAGES = 20  # per-class FID only when every requested class has at least this many samples


@dataclass(frozen=True)
class _Setup:
    prepared: PreparedDataset
    extractor: Extractor
    reference: ReferenceSet
    split: str
    data_dir: str | Path


def _setup(data: DataConfig, extractor: str, split: str, inception_weights: str | Path | None,
           progress: bool) -> _Setup:
    """Dataset, extractor weights and reference split: everything that can fail before sampling."""
    prepared = prepare_dataset(data.dataset, data.source, data.data_dir)
    resolved = resolve_extractor(extractor, prepared, data.data_dir, inception_weights=inception_weights,
                                 progress=progress)
    return _Setup(prepared, resolved, reference_set(prepared, split, resolved, data.data_dir), split, data.data_dir)


def _context(setup: _Setup, num_samples: int) -> dict[str, Any]:
    return {"dataset": setup.prepared.spec.name, "dataset_sha256": setup.prepared.sha256,
            "extractor_id": setup.extractor.extractor_id, "num_samples": num_samples}


def _score(images: torch.Tensor, setup: _Setup, tag: str, labels: torch.Tensor | None = None, *, batch_size: int,
           seed: int, device: torch.device, progress: bool, bootstrap: int = 0) -> dict[str, float]:
    """FID (and fid_std from `bootstrap` resamples), KID, precision/recall against the reference; with a
    classifier, the class statistics; and for class-conditional samples drawn for `labels`:

    class_consistency: share of samples the domain classifier assigns to the requested class;
    fid per class (`fid_<extractor>_<tag>_class<c>`, each against the real images of class c) and
    their mean (`..._classmean`), when every class has at least PER_CLASS_MIN_IMAGES samples.
    """
    fidelity = dict(batch_size=batch_size, seed=seed, cuda=device.type == "cuda", progress=progress)
    values = compute_metrics(images, setup.reference, setup.extractor, bootstrap=bootstrap, **fidelity)
    classifier = setup.extractor.classifier()
    if classifier is not None:
        probs = predict_probs(classifier, images, device=device)
        values.update(class_statistics(probs))
        if labels is not None:
            values["class_consistency"] = (probs.argmax(1) == labels).float().mean().item()
    short = setup.extractor.short_name
    out = {f"{metric}_{short}_{tag}": value for metric, value in values.items()}
    if labels is not None:
        classes = labels.unique().tolist()
        if min(int((labels == c).sum()) for c in classes) >= PER_CLASS_MIN_IMAGES:
            for c in classes:
                reference = reference_set(setup.prepared, setup.split, setup.extractor, setup.data_dir, label=c)
                out[f"fid_{short}_{tag}_class{c}"] = compute_metrics(images[labels == c], reference,
                                                                     setup.extractor, **fidelity)["fid"]
            out[f"fid_{short}_{tag}_classmean"] = sum(out[f"fid_{short}_{tag}_class{c}"] for c in classes) / len(classes)
    return out


def _generate(loaded: LoadedModel, settings: SampleConfig, image_shape: tuple[int, ...], device: torch.device,
              progress: bool, class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(uint8 samples [N, C, H, W] on the CPU, images per second); the denoiser is moved to `device`."""
    start = time.perf_counter()
    images = torch.cat(list(generate_batches(loaded.denoiser.to(device), loaded.denoiser.schedule, image_shape,
                                             settings, device=device, progress=progress, class_labels=class_labels)))
    return images, settings.num_samples / (time.perf_counter() - start)


def evaluate(source: LoadedModel | torch.Tensor, *, data: DataConfig | None = None, extractor: str = "lenet",
             num_samples: int = 1000, sampler: str = "ddim", steps: int | None = None, eta: float = 0.0,
             sde_noise: float = 1.0,
             spacing: str | None = None, levels_log_snr: tuple[float, ...] = (), clip_x0: bool = True, seed: int = 0,
             batch_size: int = 256,
             device: torch.device | str = "auto", split: str = REFERENCE_SPLIT, inception_weights: str | Path | None = None,
             tag: str = "samples", labels: torch.Tensor | None = None, guidance: float | None = None,
             bootstrap: int = 0, out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Metrics of a model's samples (or of given uint8 images [N, C, H, W]) against the real `split`.

    For a model, `num_samples` images are drawn with `sampler`/`steps`/`eta`/`sde_noise`/`spacing`/`levels_log_snr`
    (batch k seeded by (seed, k); unset steps and spacing take the sampler's defaults, see SampleConfig), on `device`
    (the denoiser is moved there); `data` defaults to the model's data config. For a tensor, `data` is
    required and `tag` names it in the keys. Extractor weights and the dataset are checked before any
    sampling. With `bootstrap` > 0, FID's standard error `fid_std` from that many resamples of the
    generated features. With `out`, the dict is also saved as JSON (atomically).

    Class-conditional: a conditional model is sampled for labels in the class mix of the real `split`
    (protocol.scoring_labels, seeded by `seed`) at guidance weight `guidance` (default: its config's
    sample.guidance), and the tag gets `_w<w>`;
    for a tensor, `labels` [N] names the class each image was drawn for. Either way the result also
    holds class_consistency and per-class FIDs (see _score).
    """
    device = resolve_device(str(device), DistContext())
    if isinstance(source, LoadedModel):
        if guidance is not None and not source.config.conditional:
            raise ConfigError("guidance was given but this model is unconditional (trained without classes)")
        if source.config.conditional and guidance is None:
            guidance = source.config.sample.guidance
        schedule = source.denoiser.schedule
        settings = SampleConfig(sampler=sampler, steps=steps, eta=eta, sde_noise=sde_noise, spacing=spacing,
                                levels_log_snr=levels_log_snr, num_samples=num_samples,
                                batch_size=batch_size, clip_x0=clip_x0, seed=seed,
                                guidance=guidance or 0.0).resolved(schedule.timesteps)  # validates them
        if settings.steps > schedule.timesteps:
            raise ConfigError(f"steps={settings.steps} exceeds the model's {schedule.timesteps} timesteps")
        data = data or source.config.data
        tag = sampler_tag(sampler, settings.steps, guidance)
    elif isinstance(source, torch.Tensor):
        if data is None:
            raise ConfigError("evaluating a tensor of images needs data= (the dataset to compare with)")
        num_samples = len(source)
        if labels is not None and tuple(labels.shape) != (num_samples,):
            raise ConfigError(f"labels must have shape [{num_samples}] (one per image), got {tuple(labels.shape)}")
    else:
        raise ConfigError(f"evaluate() takes a LoadedModel or a uint8 image tensor, not {type(source).__name__}")
    if num_samples < MIN_SCORED_IMAGES:
        raise ConfigError(f"{num_samples} images are too few to score: FID, KID and precision/recall need at least "
                          f"{MIN_SCORED_IMAGES} (num_samples, -n)")
    setup = _setup(data, extractor, split, inception_weights, progress)
    spec = setup.prepared.spec
    image_shape = (spec.channels, spec.image_size, spec.image_size)
    if isinstance(source, torch.Tensor) and (source.dtype != torch.uint8 or tuple(source.shape[1:]) != image_shape):
        raise ConfigError(f"{spec.name} samples must be uint8 [N, {', '.join(map(str, image_shape))}], "
                         f"got {source.dtype} {tuple(source.shape)}")
    result = {**_context(setup, num_samples), "reference_split": split}
    if isinstance(source, LoadedModel):
        if source.config.conditional:
            labels = scoring_labels(setup.prepared, split, source.config.model.num_classes, num_samples, seed)
        images, images_per_s = _generate(source, settings, image_shape, device, progress, labels)
        result.update(sampler=sampler, steps=settings.steps, eta=eta, spacing=settings.spacing, seed=seed,
                      sampling_images_per_s=images_per_s)
        if settings.levels_log_snr:
            result["levels_log_snr"] = list(settings.levels_log_snr)
        if sampler == "dpm++2m-sde":
            result["sde_noise"] = settings.sde_noise
        if guidance is not None:
            result["guidance"] = guidance
    else:
        images = source
    result.update(_score(images, setup, tag, None if labels is None else labels.cpu(), batch_size=batch_size,
                         seed=seed, device=device, progress=progress, bootstrap=bootstrap))
    if out is not None:
        save_metrics(out, result)
    return result


def fid_gap_std(images_a: torch.Tensor, images_b: torch.Tensor, *, data: DataConfig, extractor: str = "lenet",
                bootstrap: int = 100, seed: int = 0, batch_size: int = 256, device: torch.device | str = "auto",
                split: str = REFERENCE_SPLIT, inception_weights: str | Path | None = None,
                progress: bool = False) -> float:
    """The standard error of FID(images_b) − FID(images_a) against the real `split`, from `bootstrap`
    paired resamples (metrics.fid_gap_bootstrap_std): image i of both sets must come from the same
    starting noise (and class label), as two models' samples under one sampling seed do."""
    if images_a.shape != images_b.shape:
        raise ConfigError(f"paired image sets must have one shape, got {tuple(images_a.shape)} and "
                          f"{tuple(images_b.shape)}")
    if bootstrap < 2:
        raise ConfigError(f"the paired standard error needs bootstrap >= 2 resamples, got {bootstrap}")
    device = resolve_device(str(device), DistContext())
    setup = _setup(data, extractor, split, inception_weights, progress)

    net = feature_network(setup.extractor, device.type == "cuda")

    def features(images: torch.Tensor) -> torch.Tensor:
        return extract_features(images, setup.extractor, batch_size, device.type == "cuda", progress, net)

    return fid_gap_bootstrap_std(features(images_a), features(images_b), setup.reference.features(features),
                                 bootstrap, seed)


def compute_floors(data: DataConfig, *, extractor: str = "lenet", num_samples: int = 1000, split: str = REFERENCE_SPLIT,
                   seed: int = 0, batch_size: int = 256, device: torch.device | str = "auto",
                   inception_weights: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """The metrics of N random real train images (tag `train`: the best reachable at this N) and of N
    uniform random uint8 images (tag `noise`), both against the real `split`."""
    device = resolve_device(str(device), DistContext())
    setup = _setup(data, extractor, split, inception_weights, progress)
    train_images, _ = setup.prepared.load("train")
    if num_samples > len(train_images):
        raise ConfigError(f"num_samples={num_samples} exceeds the {len(train_images)} train images")
    generator = torch.Generator().manual_seed(seed)
    real = train_images[torch.randperm(len(train_images), generator=generator)[:num_samples]]
    noise = torch.randint(0, 256, (num_samples, *real.shape[1:]), generator=generator, dtype=torch.uint8)
    result = {**_context(setup, num_samples), "reference_split": split}
    for tag, images in (("train", real), ("noise", noise)):
        result.update(_score(images, setup, tag, batch_size=batch_size, seed=seed, device=device, progress=progress))
    return result


def save_metrics(path: str | Path, metrics: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def format_table(metrics: dict[str, Any]) -> str:
    """One row per tag found in `metrics` (e.g. ddim50, train, noise), one column per metric."""
    rows = [key.split("_", 2)[1:] for key in metrics  # [extractor, tag]; per-class FIDs stay out
            if key.startswith("fid_") and not key.startswith("fid_std_") and "_class" not in key]
    columns = [c for c in TABLE_COLUMNS if any(f"{c}_{e}_{t}" in metrics for e, t in rows)]
    lines = [f"{'images':<12}" + "".join(f"{c:>20}" for c in columns)]
    for short, tag in rows:
        cells = [metrics.get(f"{c}_{short}_{tag}") for c in columns]
        lines.append(f"{tag:<12}" + "".join(f"{'-' if v is None else f'{v:.4g}':>20}" for v in cells))
    return "\n".join(lines)
