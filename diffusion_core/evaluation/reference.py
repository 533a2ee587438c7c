"""Reference statistics of the real data, computed once per (dataset sha256, extractor id, split).

The real split's features (and its FID mean/covariance) are cached by torch-fidelity's own cache
(`cache_root` + `input2_cache_name`) under `<data_dir>/reference_stats/`, in files named
`<dataset>-<dataset sha256[:12]>-<split>-<extractor id>-<extractor>-{features,stat-fid}-<layer>.pt`.
A later evaluation finds them and skips the extraction. (torch-fidelity reads these files with
torch.load; they are only ever written by torch-fidelity into this folder.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import PreparedDataset
from .extractors import Extractor


@dataclass(frozen=True)
class ReferenceSet:
    images: torch.Tensor   # uint8 [N, C, H, W], the real split
    cache_root: Path
    cache_name: str


def reference_set(prepared: PreparedDataset, split: str, extractor: Extractor, data_dir: str | Path,
                  label: int | None = None) -> ReferenceSet:
    """The real `split` (only its images of class `label` if given), with its cache name."""
    images, labels = prepared.load(split)
    name = f"{prepared.spec.name}-{prepared.sha256[:12]}-{split}-{extractor.extractor_id}"
    if label is not None:
        images, name = images[labels == label], f"{name}-class{label}"
    return ReferenceSet(images, Path(data_dir) / "reference_stats", name)
