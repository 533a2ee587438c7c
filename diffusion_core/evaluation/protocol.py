"""The scoring protocol: how a model is sampled for a score, the champion's setting among them, and the
class labels a conditional model is scored with.

The champion's score (the pipeline's primary setting) and `diffusion evaluate --model DIR` without
sampling flags both come from `primary_settings(config)`: the config's own sampler, steps, η, spacing,
batch size, clip and seed with `evaluation.num_samples` images, at `sample.guidance` for a conditional
model; FID's bootstrap is `evaluation.bootstrap` and the reference is REFERENCE_SPLIT. A conditional
model is scored with `scoring_labels`: the reference split's class mix, so that the generated set is
compared with real images of the same class proportions.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..config import Config, SampleConfig
from ..data import PreparedDataset

REFERENCE_SPLIT = "test"  # the real split every score is computed against
_LABEL_STREAM = 0x1ABE1  # keeps the label order's random stream apart from the sampler's noise


def sampling_settings(config: Config, **changes) -> SampleConfig:
    """`config.sample` with `changes`, steps and spacing resolved for the model's T; an unconditional
    model gets guidance 0 (it has no classes to guide towards), another sampler no levels_log_snr and the
    default sde_noise (they are the consistency and dpm++2m-sde samplers')."""
    if not config.conditional:
        changes["guidance"] = 0.0
    if changes.get("sampler", config.sample.sampler) != config.sample.sampler:
        changes.setdefault("levels_log_snr", ())
        changes.setdefault("sde_noise", 1.0)
    return dataclasses.replace(config.sample, **changes).resolved(config.diffusion.timesteps)


def primary_settings(config: Config) -> SampleConfig:
    """The champion's sampling settings: the config's own sampler, steps, η and spacing (the preset's
    choice) with the evaluation budget of `evaluation.num_samples` images."""
    return sampling_settings(config, num_samples=config.evaluation.num_samples)


def class_frequency_labels(class_counts: torch.Tensor, num_samples: int, seed: int) -> torch.Tensor:
    """`num_samples` class labels in the proportions of `class_counts` (images per class of the
    reference split), in a seeded random order.

    Counts: largest-remainder allocation. With M = Σ n_c, class c gets ⌊N·n_c/M⌋ labels and the
    N − Σ⌊N·n_c/M⌋ left over go one each to the classes with the largest remainders N·n_c mod M (ties:
    the lower class), so every count is within one of its exact share N·n_c/M. Exact shares rather
    than a multinomial draw: a multinomial's counts scatter by about √(N·p_c) per class, which would
    move FID from seed to seed for a reason that is not the model.

    Order: a permutation drawn from (seed, N) on a stream of its own (numpy SeedSequence), so that every
    sampling batch mixes the classes and the labels do not share random numbers with the noise.
    """
    counts = [int(n) for n in class_counts.tolist()]
    if num_samples < 1 or not counts or min(counts) < 0 or sum(counts) == 0:
        raise ValueError(f"class labels need num_samples >= 1 and non-negative class counts with a positive "
                         f"sum; got num_samples={num_samples}, counts={counts}")
    total = sum(counts)
    shares = [(num_samples * n // total, num_samples * n % total) for n in counts]
    allocated = [whole for whole, _ in shares]
    by_remainder = sorted(range(len(counts)), key=lambda c: (-shares[c][1], c))
    for c in by_remainder[:num_samples - sum(allocated)]:
        allocated[c] += 1
    labels = np.repeat(np.arange(len(counts)), allocated)
    order = np.random.default_rng([_LABEL_STREAM, seed, num_samples]).permutation(num_samples)
    return torch.from_numpy(labels[order]).long()


def scoring_labels(prepared: PreparedDataset, split: str, num_classes: int, num_samples: int,
                   seed: int) -> torch.Tensor:
    """The labels a conditional model's `num_samples` images are drawn for when they are scored against
    the real `split`: that split's class mix (class_frequency_labels), for the sampling seed `seed`."""
    _, labels = prepared.load(split)
    counts = torch.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes:
        raise ValueError(f"the {split} split of {prepared.spec.name} has classes up to {len(counts) - 1}, more "
                         f"than the model's {num_classes}: score a model trained on this dataset")
    return class_frequency_labels(counts, num_samples, seed)
