"""Sample-quality evaluation: FID, KID, precision/recall (torch-fidelity) with comparable, cached references.

Every number is tied to what produced it: the dataset version (dataset_sha256), the feature
extractor's weights (extractor_id = name + sha256 prefix), the sampler and its steps (in the key).

Feature extractors (`--extractor`):
  lenet      the project's LeNet classifier for 28×28 grayscale datasets (MNIST: ≥ 99 % test
             accuracy). Works offline. Trained once per dataset version and cached in
             `<data_dir>/extractors/`; weights for the canonical MNIST ship in `pretrained/`.
  inception  torch-fidelity's Inception-v3 (`inception-v3-compat`), the FID of the literature. Its
             weights come from --inception-weights, $DIFFUSION_INCEPTION_WEIGHTS, or the torch hub
             cache ($TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth),
             downloaded there when online; offline without them it fails before sampling.

Commands:
  diffusion evaluate-extractor --preset mnist-cpu
      train (or find and verify) the lenet classifier for the preset's dataset and print its accuracy;
      add `--copy-to diffusion_core/evaluation/pretrained` to refresh the shipped weights.
  diffusion evaluate --model runs/mnist-cpu --out metrics.json
      score the model exactly as the pipeline scores its champion (protocol.primary_settings: the
      config's sampler, steps, η, spacing, seed and evaluation.num_samples images, FID's bootstrap,
      a conditional model's labels in the test split's class mix) against the test split, print a
      table, write flat JSON. Flags change one thing each: --sampler ddim --steps 50 -n 500 …
  diffusion evaluate --model runs/mnist-cpu --floors     (or without --model: floors only)
      also score N real train images (best reachable at this N) and N noise images (worst).
The data source/folder come from the model's config, overridden by $DIFFUSION_DATA_SOURCE /
$DIFFUSION_DATA_DIR, then by --data-source / --data-dir.

Library: `evaluate(load_model(path), num_samples=1000, sampler="ddim", steps=50)` or
`evaluate(images_u8, data=config.data)`; `compute_floors(config.data, num_samples=1000)`;
`compute_metrics(images, reference, resolve_extractor("lenet", prepared, data_dir))` for two tensors.
"""

from .classifier import LeNet, class_statistics, train_classifier
from .classifier_store import ensure_classifier
from .evaluator import compute_floors, evaluate, format_table, save_metrics
from .extractors import EXTRACTORS, Extractor, resolve_extractor
from .metrics import compute_metrics

__all__ = [
    "EXTRACTORS", "Extractor", "LeNet", "class_statistics", "compute_floors", "compute_metrics", "ensure_classifier",
    "evaluate", "format_table", "resolve_extractor", "save_metrics", "train_classifier",
]
