"""The scoring protocol: `diffusion evaluate` without flags scores the champion's setting, and conditional
models are scored with labels in the class mix of the split FID is computed against."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch

from diffusion_core import load_model
from diffusion_core.cli import main
from diffusion_core.data import prepare_dataset
from diffusion_core.evaluation import evaluate
from diffusion_core.evaluation.protocol import class_frequency_labels, scoring_labels
from diffusion_core.samplers import generate_batches

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # images per digit, MNIST test split


@pytest.fixture(scope="session")
def prepared(mnist_raw_source, data_dir):
    return prepare_dataset("mnist", str(mnist_raw_source), data_dir)


def largest_remainder(counts: list[int], n: int) -> list[int]:
    """Hamilton's apportionment in exact fractions: every class its whole share of n, then one more each
    for the classes with the largest fractional parts, the lower class first on ties."""
    shares = [Fraction(n * c, sum(counts)) for c in counts]
    whole = [math.floor(share) for share in shares]
    by_fraction = sorted(range(len(counts)), key=lambda c: (whole[c] - shares[c], c))
    for c in by_fraction[:n - sum(whole)]:
        whole[c] += 1
    return whole


def test_scoring_labels_have_the_reference_split_class_counts_scaled_to_n(prepared):
    _, split_labels = prepared.load("test")
    split_counts = [int((split_labels == c).sum()) for c in range(10)]
    assert split_counts == MNIST_TEST_COUNTS
    for n in (7, 64, 200, 1000, 10_000, 25_000):
        counts = torch.bincount(scoring_labels(prepared, "test", 10, n, seed=0), minlength=10).tolist()
        assert counts == largest_remainder(split_counts, n), n
        assert all(abs(count - Fraction(n * c, 10_000)) < 1 for count, c in zip(counts, split_counts)), n
    # by hand: 98.0, 113.5, 103.2, 101.0, 98.2, 89.2, 95.8, 102.8, 97.4, 100.9 → 996 whole, the 4 left over
    # to the largest fractions .9 (digit 9), .8 (6 and 7), .5 (1)
    thousand = torch.bincount(scoring_labels(prepared, "test", 10, 1000, seed=0), minlength=10).tolist()
    assert thousand == [98, 114, 103, 101, 98, 89, 96, 103, 97, 101]
    assert torch.bincount(scoring_labels(prepared, "test", 10, 10_000, seed=3)).tolist() == MNIST_TEST_COUNTS


def test_label_counts_by_hand_ties_and_bad_input():
    assert torch.bincount(class_frequency_labels(torch.tensor([1, 2, 3]), 4, seed=0), minlength=3).tolist() == [1, 1, 2]
    assert class_frequency_labels(torch.tensor([1, 1]), 1, seed=5).tolist() == [0]  # tie: the lower class
    assert torch.bincount(class_frequency_labels(torch.tensor([0, 5, 5]), 3, seed=0), minlength=3).tolist() == [0, 2, 1]
    for counts, n in (([3, 1], 0), ([0, 0], 5), ([2, -1], 5), ([], 5)):
        with pytest.raises(ValueError, match="non-negative class counts"):
            class_frequency_labels(torch.tensor(counts, dtype=torch.long), n, seed=0)


def test_label_order_is_a_function_of_seed_and_n(prepared):
    first = scoring_labels(prepared, "test", 10, 1000, seed=0)
    assert torch.equal(first, scoring_labels(prepared, "test", 10, 1000, seed=0))
    other = scoring_labels(prepared, "test", 10, 1000, seed=1)
    assert not torch.equal(first, other) and torch.equal(first.sort().values, other.sort().values)
    assert not torch.equal(first, first.sort().values)  # mixed, so every sampling batch holds every class
    assert len(first[:64].unique()) == 10


def test_evaluate_without_flags_scores_the_champion_setting(smoke_cond_run, tmp_path):
    """`diffusion evaluate --model DIR` and the pipeline's primary setting (flows.sample draws the images,
    flows.evaluate scores them) give the same images: bit-equal scores, with the same labels."""
    from flows.sample import primary_setting

    out = tmp_path / "cli.json"
    main(["evaluate", "--model", str(smoke_cond_run), "--device", "cpu", "--out", str(out)])
    cli = json.loads(out.read_text())
    # the smoke preset's [sample] and [evaluation], read off the file: DDIM, 10 steps (T = 100), η 0,
    # steps even in t (DDIM's default), seed 0, guidance 0, 200 images, 20 bootstrap resamples
    assert {k: cli[k] for k in ("sampler", "steps", "eta", "spacing", "seed", "num_samples", "guidance")} == {
        "sampler": "ddim", "steps": 10, "eta": 0.0, "spacing": "linear", "seed": 0, "num_samples": 200,
        "guidance": 0.0}

    loaded = load_model(smoke_cond_run, "cpu")
    config = loaded.config
    primary = primary_setting(config)
    s = primary.settings
    prepared = prepare_dataset(config.data.dataset, config.data.source, config.data.data_dir)
    labels = scoring_labels(prepared, "test", 10, s.num_samples, s.seed)
    images = torch.cat(list(generate_batches(loaded.denoiser, loaded.denoiser.schedule, (1, 28, 28), s,
                                             device=torch.device("cpu"), progress=False, class_labels=labels)))
    pipeline = evaluate(images, labels=labels, data=config.data, tag=primary.tag, device="cpu", progress=False,
                        seed=s.seed, bootstrap=config.evaluation.bootstrap)
    assert primary.tag == "ddim10_w0"
    for metric in ("fid", "fid_std", "kid", "precision", "recall", "class_consistency"):
        key = f"{metric}_lenet_{primary.tag}"
        assert cli[key] == pipeline[key], key
