"""Reference features of the real data, computed once per (dataset sha256, split, extractor id).

The real split's features (the layer FID, KID and precision/recall use) are cached in the project's
own safetensors file `<data_dir>/reference_stats/<dataset>-<sha256[:12]>-<split>-<extractor id>.safetensors`
(`-class<c>` for one class), whose metadata names the full dataset sha256, split, class and
extractor id. A later evaluation reuses it; a file that is not such a safetensors file, or that
describes another reference, is refused with its path (delete it to recompute). torch-fidelity's
own (pickle) cache is never used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..data import DataError, PreparedDataset
from .extractors import Extractor

CACHE_DIR = "reference_stats"


@dataclass(frozen=True)
class ReferenceSet:
    images: torch.Tensor   # uint8 [N, C, H, W], the real split
    cache_file: Path
    metadata: dict[str, str] = field(hash=False)

    def features(self, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The cached features, or compute(images), cached (atomically) for the next evaluation."""
        if self.cache_file.exists():
            return self._load()
        features = compute(self.images).contiguous()
        with atomic_path(self.cache_file) as tmp:
            save_file({"features": features}, str(tmp), metadata=self.metadata)
        return features

    def _load(self) -> torch.Tensor:
        try:
            with safe_open(str(self.cache_file), "pt") as f:
                metadata, features = f.metadata(), f.get_tensor("features")
        except (SafetensorError, OSError, KeyError) as exc:
            raise DataError(f"{self.cache_file} is not a safetensors file of reference features ({exc}); "
                               "delete it to recompute the reference") from exc
        if metadata != self.metadata or features.dim() != 2 or len(features) != len(self.images):
            raise DataError(f"{self.cache_file} holds other reference features ({metadata}, shape "
                               f"{tuple(features.shape)}) than {self.metadata} of {len(self.images)} images; "
                               "delete it to recompute the reference")
        return features


def reference_set(prepared: PreparedDataset, split: str, extractor: Extractor, data_dir: str | Path,
                  label: int | None = None) -> ReferenceSet:
    """The real `split` (only its images of class `label` if given), with its cache file."""
    images, labels = prepared.load(split)
    name = f"{prepared.spec.name}-{prepared.sha256[:12]}-{split}-{extractor.extractor_id}"
    if label is not None:
        images, name = images[labels == label], f"{name}-class{label}"
    metadata = {"dataset": prepared.spec.name, "dataset_sha256": prepared.sha256, "split": split,
                "label": "all" if label is None else str(label), "extractor_id": extractor.extractor_id}
    return ReferenceSet(images, Path(data_dir) / CACHE_DIR / f"{name}.safetensors", metadata)
