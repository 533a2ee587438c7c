"""Feature extractors for the metrics, selectable by name, each identified by the sha256 of its weights.

  - `lenet` (`lenet-<dataset>`): the project's LeNet classifier trained on the dataset (see
    classifier_store), registered with torch-fidelity through its extension API. Features: the
    128-d penultimate layer `fc1` for FID/KID/precision-recall; `logits` for the class statistics.
  - `inception` (`inception-v3-compat`): torch-fidelity's built-in Inception-v3 (2048-d pool
    features), the network behind published FID numbers; grayscale images are repeated to RGB.

`extractor_id` = "<extractor>-<first 12 hex of the weights' sha256>", so numbers computed with
different weights are never mixed up (it also keys the reference-statistics cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ..data import PreparedDataset
from .classifier import LeNet, load_classifier
from .classifier_store import ensure_classifier
from .inception import inception_weights_sha256, resolve_inception_weights

INCEPTION_NAME = "inception-v3-compat"
EXTRACTORS = ("lenet", "inception")


@dataclass(frozen=True)
class Extractor:
    short_name: str      # "lenet" | "inception", used in metric keys
    fidelity_name: str   # the name torch-fidelity knows it by
    extractor_id: str    # names the exact weights
    weights_path: Path
    rgb: bool            # repeat 1-channel images to 3 channels before extraction

    def classifier(self) -> LeNet | None:
        """The classifier behind the features, where there is one (for the class statistics)."""
        return load_classifier(self.weights_path) if self.short_name == "lenet" else None


class LeNetFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity adapter: uint8 [B, 1, 28, 28] → the requested LeNet features, in `features_list` order.

    torch-fidelity passes every metric keyword to the constructor; the weights come from
    `feature_extractor_weights_path`.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{name} needs feature_extractor_weights_path (the classifier's safetensors file)")
        self.net = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("fc1", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else "fc1"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)

    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.net.features(images_u8)
        return tuple(features[name] for name in self.features_list)


def canonical_name(name: str, dataset: str) -> str:
    """'lenet' | 'lenet-<dataset>' → 'lenet'; 'inception' | 'inception-v3-compat' → 'inception'."""
    aliases = {"lenet": "lenet", f"lenet-{dataset}": "lenet", "inception": "inception", INCEPTION_NAME: "inception"}
    if name not in aliases:
        raise ValueError(f"unknown feature extractor {name!r}; choose lenet (lenet-{dataset}) or inception "
                         f"({INCEPTION_NAME})")
    return aliases[name]


def resolve_extractor(name: str, prepared: PreparedDataset, data_dir: str | Path, *,
                      inception_weights: str | Path | None = None, progress: bool = True) -> Extractor:
    """Locate (or, for lenet, train once) the weights and register the extractor with torch-fidelity.

    Fails here, before any sampling, when the weights are unavailable.
    """
    if canonical_name(name, prepared.spec.name) == "inception":
        path = resolve_inception_weights(inception_weights)
        return Extractor("inception", INCEPTION_NAME, f"{INCEPTION_NAME}-{inception_weights_sha256(path)[:12]}",
                         path, rgb=True)
    record = ensure_classifier(prepared, data_dir, progress=progress)
    fidelity_name = f"lenet-{prepared.spec.name}"
    if fidelity_name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(fidelity_name, LeNetFeatureExtractor)
    return Extractor("lenet", fidelity_name, record.extractor_id, record.weights_path, rgb=False)
