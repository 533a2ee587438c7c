"""The domain classifier's weights: trained once per dataset version, identified by their sha256, reused.

Files: `<data_dir>/extractors/lenet-<dataset>-<dataset sha256[:12]>.safetensors` plus a `.json`
beside it holding extractor_id, dataset, dataset_sha256, weights_sha256 (of the safetensors file),
test_accuracy, seed, epochs and train_seconds. Lookup order:
  1. that cache file;
  2. the weights shipped in `diffusion_core/evaluation/pretrained/lenet-<dataset>.safetensors`, if they
     were trained on the same dataset version;
  3. otherwise train (seeded, with a progress bar) and write the cache atomically.
A weights file whose sha256 differs from its metadata is an error: it is never retrained over.
`diffusion evaluate-extractor` runs this lookup (training if needed) and can copy the result into
the shipped folder.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..atomic import atomic_path, atomic_write_text
from ..config import ConfigError
from ..data import DataError, PreparedDataset, file_digest
from .classifier import accuracy, train_classifier

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
WEIGHTS_FORMAT = "diffusion-lenet-v1"


@dataclass(frozen=True)
class ClassifierRecord:
    weights_path: Path
    meta: dict[str, Any]

    @property
    def extractor_id(self) -> str:
        return self.meta["extractor_id"]


def file_sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def check_lenet_dataset(prepared: PreparedDataset) -> None:
    spec = prepared.spec
    if spec.channels != 1 or spec.image_size != 28:
        raise ConfigError(f"the lenet extractor is for 28×28 grayscale datasets, not {spec.name} "
                         f"({spec.channels}×{spec.image_size}×{spec.image_size}); use the inception extractor")


def cache_path(prepared: PreparedDataset, data_dir: str | Path) -> Path:
    return Path(data_dir) / "extractors" / f"lenet-{prepared.spec.name}-{prepared.sha256[:12]}.safetensors"


def shipped_path(dataset: str) -> Path:
    return PRETRAINED_DIR / f"lenet-{dataset}.safetensors"


def _read_meta(weights_path: Path) -> dict[str, Any]:
    meta_path = weights_path.with_suffix(".json")
    if not meta_path.is_file():
        raise DataError(f"{weights_path} has no metadata file {meta_path.name}; delete the weights to retrain them")
    return json.loads(meta_path.read_text())


def load_verified(weights_path: Path, dataset_sha256: str) -> ClassifierRecord:
    """The record of `weights_path`, after checking its sha256 and dataset version against its metadata."""
    meta = _read_meta(weights_path)
    actual = file_sha256(weights_path)
    if actual != meta["weights_sha256"]:
        raise DataError(f"{weights_path} has sha256 {actual} but its metadata records {meta['weights_sha256']}: "
                           "the file was changed or corrupted. Restore it, or delete both files to retrain.")
    if meta["dataset_sha256"] != dataset_sha256:
        raise DataError(f"{weights_path} was trained on dataset version {meta['dataset_sha256'][:12]}, "
                           f"not on {dataset_sha256[:12]}")
    return ClassifierRecord(weights_path, meta)


def train_and_save(prepared: PreparedDataset, data_dir: str | Path, *, epochs: int = 3, seed: int = 0,
                   progress: bool = True) -> ClassifierRecord:
    """Train on the train split, measure test accuracy, write weights + metadata to the cache."""
    images, labels = prepared.load("train")
    start = time.perf_counter()
    net = train_classifier(images, labels, num_classes=prepared.spec.num_classes, epochs=epochs, seed=seed,
                           progress=progress)
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(net, *prepared.load("test"))
    path = cache_path(prepared, data_dir)
    with atomic_path(path) as tmp:  # metadata is written first, so a weights file always has its metadata
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
                  metadata={"format": WEIGHTS_FORMAT, "dataset_sha256": prepared.sha256})
        weights_sha = file_sha256(tmp)
        meta = {
            "extractor_id": f"lenet-{prepared.spec.name}-{weights_sha[:12]}", "dataset": prepared.spec.name,
            "dataset_sha256": prepared.sha256, "weights_sha256": weights_sha, "test_accuracy": test_accuracy,
            "seed": seed, "epochs": epochs, "train_seconds": round(seconds, 1),
        }
        atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return ClassifierRecord(path, meta)


def ensure_classifier(prepared: PreparedDataset, data_dir: str | Path, *, epochs: int = 3, seed: int = 0,
                      progress: bool = True) -> ClassifierRecord:
    """The verified classifier for this dataset version: cached, shipped, or trained now (see module doc)."""
    check_lenet_dataset(prepared)
    cached = cache_path(prepared, data_dir)
    if cached.is_file():
        return load_verified(cached, prepared.sha256)
    shipped = shipped_path(prepared.spec.name)
    if shipped.is_file() and _read_meta(shipped)["dataset_sha256"] == prepared.sha256:
        return load_verified(shipped, prepared.sha256)
    print(f"training the lenet-{prepared.spec.name} classifier for dataset version {prepared.sha256[:12]} "
          f"(once; cached as {cached})", file=sys.stderr)
    return train_and_save(prepared, data_dir, epochs=epochs, seed=seed, progress=progress)


def export_classifier(record: ClassifierRecord, directory: str | Path) -> Path:
    """Copy weights + metadata to `directory/lenet-<dataset>.{safetensors,json}` (the shipped layout)."""
    target = Path(directory) / f"lenet-{record.meta['dataset']}.safetensors"
    with atomic_path(target) as tmp:
        shutil.copyfile(record.weights_path, tmp)
        atomic_write_text(target.with_suffix(".json"), record.weights_path.with_suffix(".json").read_text())
    return target
