"""Feature extractors for the metrics, selectable by name, each identified by the sha256 of its weights.

  - `lenet` (`lenet-<dataset>`): the project's LeNet classifier trained on the dataset (see
    classifier_store), wrapped in torch-fidelity's extractor interface. Features: the 128-d
    penultimate layer `fc1` for FID/KID/precision-recall; `logits` for the class statistics.
  - `inception` (`inception-v3-compat`): torch-fidelity's Inception-v3 (2048-d pool features), the
    network behind published FID numbers; grayscale images are repeated to RGB. Its weights are
    read once and loaded safely (see inception.py); torch-fidelity never opens the file.

`extractor_id` = "<extractor>-<first 12 hex of the weights' sha256>", so numbers computed with
different weights are never mixed up (it also keys the reference-statistics cache).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from ..config import ConfigError
from ..data import PreparedDataset
from .classifier import LeNet, load_classifier
from .classifier_store import ensure_classifier
from .inception import load_inception_weights, resolve_inception_weights

INCEPTION_NAME = "inception-v3-compat"
EXTRACTORS = ("lenet", "inception")


@dataclass(frozen=True)
class Extractor:
    short_name: str      # "lenet" | "inception", used in metric keys
    fidelity_name: str   # the extractor's name in torch-fidelity
    extractor_id: str    # names the exact weights
    weights_path: Path
    rgb: bool            # repeat 1-channel images to 3 channels before extraction
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)  # inception's weights

    @property
    def layer(self) -> str:
        """The feature layer of FID, KID and precision/recall."""
        return "2048" if self.short_name == "inception" else "fc1"

    def classifier(self) -> LeNet | None:
        """The classifier behind the features, where there is one (for the class statistics)."""
        return load_classifier(self.weights_path) if self.short_name == "lenet" else None


@functools.lru_cache(maxsize=2)
def feature_network(extractor: Extractor, cuda: bool) -> FeatureExtractorBase:
    """The extractor's network, built once per process, giving its `layer` features."""
    if extractor.short_name == "inception":
        net: FeatureExtractorBase = InceptionFromState(extractor.fidelity_name, [extractor.layer], extractor.state)
    else:
        net = LeNetFeatureExtractor(extractor.fidelity_name, [extractor.layer], extractor.weights_path)
    net = net.eval().requires_grad_(False)
    return net.cuda() if cuda else net


class InceptionFromState(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 built from a state dict that was already loaded with weights_only=True.

    torch-fidelity's constructor takes only a file to torch.load; it is handed an in-memory copy of
    these tensors, serialised here, so it never reads a file from disk.
    """

    def __init__(self, name: str, features_list: list[str], state: dict[str, torch.Tensor]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        super().__init__(name, features_list, feature_extractor_weights_path=buffer)


class LeNetFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity adapter: uint8 [B, 1, 28, 28] → the requested LeNet features, in `features_list` order."""

    def __init__(self, name: str, features_list: list[str], weights_path: Path) -> None:
        super().__init__(name, features_list)
        self.net = load_classifier(weights_path)

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
        raise ConfigError(f"unknown feature extractor {name!r}; choose lenet (lenet-{dataset}) or inception "
                         f"({INCEPTION_NAME})")
    return aliases[name]


def resolve_extractor(name: str, prepared: PreparedDataset, data_dir: str | Path, *,
                      inception_weights: str | Path | None = None, progress: bool = True) -> Extractor:
    """Locate (or, for lenet, train once) and check the weights; inception's are loaded here, once.

    Fails here, before any sampling, when the weights are unavailable or not what they should be.
    """
    if canonical_name(name, prepared.spec.name) == "inception":
        path, verify = resolve_inception_weights(inception_weights)
        state, digest = load_inception_weights(path, verify)
        return Extractor("inception", INCEPTION_NAME, f"{INCEPTION_NAME}-{digest[:12]}", path, rgb=True, state=state)
    record = ensure_classifier(prepared, data_dir, progress=progress)
    return Extractor("lenet", f"lenet-{prepared.spec.name}", record.extractor_id, record.weights_path, rgb=False)
