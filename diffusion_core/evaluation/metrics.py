"""FID, KID and precision/recall between two image sets, computed with torch-fidelity's formulas.

  - FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to the two feature sets,
    |μ1 − μ2|² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½).
  - KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel, mean and std over
    100 random subsets of min(1000, size of the smaller set) images, so small sets work too.
  - fid_std (with `bootstrap` > 0): the standard error of FID that comes from the generated set's
    finite size: the spread of FID over bootstrap resamples (drawn with replacement) of the generated
    features against the fixed reference statistics (Efron's bootstrap; measured against the spread
    of independent sampling seeds in benchmarks/eval_noise.py).
  - fid_gap_bootstrap_std: the standard error of the difference of two FIDs whose generated sets are
    paired (image i of both drawn from the same starting noise, as the promotion gate's fixed sampling
    seed makes them): the spread of FID_b − FID_a over bootstrap resamples that draw the same indices
    from both sets. Noise the two sets share cancels in the difference, so this is smaller than
    √(σ_a² + σ_b²) when the sets are correlated and equal to it (up to the bootstrap's own error) when
    they are independent.
  - precision / recall (Kynkäänniemi et al. 2019, k = 3): the share of generated samples inside the
    real manifold (k-NN balls), and of real samples inside the generated one.
The values scale with the feature space: compare numbers only between equal extractor_ids (LeNet's
KID is in the units of its features, not the ×10⁻³ of Inception). Images go in as uint8 [N, C, H, W]
tensors. Features are extracted here (in-process, no DataLoader workers) and fed to torch-fidelity's
metric functions; its file cache (torch.load of pickles) is never involved. Runs on CUDA when `cuda`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import get_featuresdict_from_dataset

from ..config import MIN_SCORED_IMAGES
from .extractors import Extractor, feature_network
from .reference import ReferenceSet

KID_MAX_SUBSET = 1000
PRC_NEIGHBORHOOD = 3


class UInt8Images(Dataset):
    """Items are single uint8 C×H×W tensors (what torch-fidelity takes), 1 channel repeated to 3 if `rgb`."""

    def __init__(self, images: torch.Tensor, rgb: bool = False) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.rgb = rgb and images.shape[1] == 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        return image.expand(3, -1, -1) if self.rgb else image


def frechet_distances(generated: np.ndarray, real_mu: np.ndarray, real_sigma: np.ndarray,
                      index_sets: np.ndarray) -> np.ndarray:
    """FID of each resample `generated[index_sets[k]]` against the fixed real statistics.

    Tr((Σg Σr)^½) is the sum of the square roots of the eigenvalues of Σg Σr, which equal those of the
    symmetric PSD matrix Σr^½ Σg Σr^½: one symmetric eigendecomposition per resample (float64)."""
    eigenvalues, eigenvectors = np.linalg.eigh(real_sigma)
    real_root = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    out = np.empty(len(index_sets))
    for k, index in enumerate(index_sets):
        x = generated[index]
        mu, sigma = x.mean(axis=0), np.cov(x, rowvar=False)
        product = np.linalg.eigvalsh(real_root @ sigma @ real_root)
        diff = mu - real_mu
        out[k] = diff @ diff + np.trace(sigma) + np.trace(real_sigma) - 2 * np.sqrt(np.clip(product, 0, None)).sum()
    return out


def _bootstrap_indices(size: int, resamples: int, seed: int) -> np.ndarray:
    """`resamples` rows of `size` indices drawn with replacement (seeded)."""
    return np.random.default_rng(seed).integers(0, size, size=(resamples, size))


def fid_bootstrap_std(generated: torch.Tensor, real: torch.Tensor, resamples: int, seed: int = 0) -> float:
    """Standard deviation of FID over `resamples` bootstrap resamples of the generated features [N, D]
    (N drawn with replacement, seeded), the real features' statistics held fixed."""
    g = generated.double().numpy()
    r = real.double().numpy()
    index_sets = _bootstrap_indices(len(g), resamples, seed)
    return float(frechet_distances(g, r.mean(axis=0), np.cov(r, rowvar=False), index_sets).std(ddof=1))


def fid_gap_bootstrap_std(generated_a: torch.Tensor, generated_b: torch.Tensor, real: torch.Tensor, resamples: int,
                          seed: int = 0) -> float:
    """Standard deviation of FID(b) − FID(a) over `resamples` paired bootstrap resamples: row i of the
    generated features `generated_a` and `generated_b` [N, D] belong together, and each resample draws
    the same N indices (with replacement, seeded) from both; the real features' statistics held fixed."""
    if generated_a.shape != generated_b.shape:
        raise ValueError(f"paired feature sets must have one shape, got {tuple(generated_a.shape)} and "
                         f"{tuple(generated_b.shape)}")
    r = real.double().numpy()
    real_mu, real_sigma = r.mean(axis=0), np.cov(r, rowvar=False)
    index_sets = _bootstrap_indices(len(generated_a), resamples, seed)
    gaps = (frechet_distances(generated_b.double().numpy(), real_mu, real_sigma, index_sets)
            - frechet_distances(generated_a.double().numpy(), real_mu, real_sigma, index_sets))
    return float(gaps.std(ddof=1))


def extract_features(images: torch.Tensor, extractor: Extractor, batch_size: int = 256, cuda: bool | None = None,
                     progress: bool = True, net=None) -> torch.Tensor:
    """The `extractor`'s features [N, D] of uint8 images [N, C, H, W] (in-process, no worker processes);
    `net`: its feature network when already built (feature_network), so several sets load it once."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    net = feature_network(extractor, cuda) if net is None else net
    data = UInt8Images(images, extractor.rgb)
    return get_featuresdict_from_dataset(data, net, batch_size, cuda, True, progress)[extractor.layer]


def compute_metrics(images: torch.Tensor, reference: torch.Tensor | ReferenceSet, extractor: Extractor, *,
                    batch_size: int = 256, seed: int = 0, cuda: bool | None = None, bootstrap: int = 0,
                    progress: bool = True) -> dict[str, float]:
    """{'fid', 'kid', 'kid_std', 'precision', 'recall'} of `images` against `reference`, and 'fid_std'
    from `bootstrap` resamples when that is > 0.

    A ReferenceSet's features are cached and reused (see reference.py); a plain tensor is not cached.
    """
    real = reference.images if isinstance(reference, ReferenceSet) else reference
    smaller = min(len(images), len(real))
    if smaller < MIN_SCORED_IMAGES:
        raise ValueError(f"need at least {MIN_SCORED_IMAGES} images per set (precision/recall's {PRC_NEIGHBORHOOD} "
                         f"nearest neighbours), got {smaller}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    net = feature_network(extractor, cuda)

    def features(x: torch.Tensor) -> torch.Tensor:
        return extract_features(x, extractor, batch_size, cuda, progress, net)

    generated = features(images)
    real_features = reference.features(features) if isinstance(reference, ReferenceSet) else features(real)
    fid = fid_statistics_to_metric(fid_features_to_statistics(generated), fid_features_to_statistics(real_features),
                                   progress)
    kid = kid_features_to_metric(generated, real_features, kid_subset_size=min(KID_MAX_SUBSET, smaller),
                                 rng_seed=seed, verbose=progress)
    prc = prc_features_to_metric(generated, real_features, prc_neighborhood=PRC_NEIGHBORHOOD, save_cpu_ram=True,
                                 verbose=progress)
    uncertainty = {"fid_std": fid_bootstrap_std(generated, real_features, bootstrap, seed)} if bootstrap else {}
    return {
        "fid": fid[torch_fidelity.KEY_METRIC_FID], **uncertainty,
        "kid": kid[torch_fidelity.KEY_METRIC_KID_MEAN],
        "kid_std": kid[torch_fidelity.KEY_METRIC_KID_STD],
        "precision": prc[torch_fidelity.KEY_METRIC_PRECISION],
        "recall": prc[torch_fidelity.KEY_METRIC_RECALL],
    }
