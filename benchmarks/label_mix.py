"""What the class mix of a conditional model's evaluation labels does to its FID: balanced labels
(0, 1, …, K−1, 0, …) against labels in the test split's class mix (the protocol's scoring_labels).

    python benchmarks/label_mix.py --model runs/cond -n 10000 --seeds 0 [--labels balanced frequency] \
        [--bootstrap 0] [--out-dir benchmarks/results/labels]
    python benchmarks/label_mix.py --real-draws 5 -n 10000 [--preset mnist-cpu-cond]

`--real-draws K`: the same question for a perfect model, with no sampling: K random sets of N real
train images with each rule's class counts (draw k seeded by k), scored against the test split;
`real-<labels>-n<N>.json` holds every draw's FID, their mean and standard deviation.

Both draws use the model's primary setting (protocol.primary_settings: its sampler, steps, η, spacing,
batch size and guidance) at the same sampling seed and N, so the labels are the only difference; FID
in the LeNet features against the test split. One JSON per (labels, N, seed) in --out-dir:
`<labels>-n<N>-seed<seed>.json` with the scores, the class counts and the sampling speed beside this
machine's fp32 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffusion_core import load_config, load_model
from diffusion_core.data import prepare_dataset
from diffusion_core.evaluation import evaluate, save_metrics
from diffusion_core.evaluation.evaluator import sampler_tag
from diffusion_core.evaluation.protocol import REFERENCE_SPLIT, primary_settings, scoring_labels
from diffusion_core.guidance import balanced_labels
from diffusion_core.runtime import matmul_gflops
from diffusion_core.samplers import generate_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a class-conditional model: exported folder, run folder or training "
                                         "checkpoint")
    parser.add_argument("--real-draws", type=int, default=0, help="also score this many sets of real train images "
                                                                   "per label rule")
    parser.add_argument("--preset", default="mnist-cpu-cond", help="data settings without --model")
    parser.add_argument("-n", "--num-samples", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds")
    parser.add_argument("--labels", nargs="+", default=["balanced", "frequency"], choices=["balanced", "frequency"])
    parser.add_argument("--bootstrap", type=int, default=0, help="resamples for fid_std (0: none)")
    parser.add_argument("--out-dir", default="benchmarks/results/labels")
    args = parser.parse_args()

    if not args.model and not args.real_draws:
        raise SystemExit("give --model DIR (a class-conditional model) and/or --real-draws K")
    loaded = load_model(args.model) if args.model else None
    config = load_config(args.preset) if loaded is None else loaded.config
    if not config.conditional:
        raise SystemExit(f"{args.model or args.preset} is unconditional: the label mix only matters for a "
                         "class-conditional model")
    prepared = prepare_dataset(config.data.dataset, config.data.source, config.data.data_dir)
    for rule in args.labels if args.real_draws else []:
        score_real_sets(prepared, config, rule, args)
    if loaded is not None:
        score_model(loaded, prepared, args)


def _labels(rule: str, prepared, num_classes: int, num_samples: int, seed: int) -> torch.Tensor:
    if rule == "balanced":
        return balanced_labels(num_samples, num_classes)
    return scoring_labels(prepared, REFERENCE_SPLIT, num_classes, num_samples, seed)


def score_real_sets(prepared, config, rule: str, args) -> None:
    """FID against the test split of `--real-draws` random sets of N real train images, each with the
    class counts of `rule`: the label mix's effect on a model that draws every class perfectly."""
    images, labels = prepared.load("train")
    counts = torch.bincount(_labels(rule, prepared, config.model.num_classes, args.num_samples, 0),
                            minlength=config.model.num_classes)
    fids = []
    for draw in range(args.real_draws):
        generator = torch.Generator().manual_seed(draw)
        pick = torch.cat([torch.nonzero(labels == c)[:, 0][torch.randperm(int((labels == c).sum()),
                                                                          generator=generator)[:n]]
                          for c, n in enumerate(counts.tolist())])
        result = evaluate(images[pick], labels=labels[pick], data=config.data, tag="train", seed=draw, device="cpu",
                          progress=False)
        fids.append(result["fid_lenet_train"])
    mean = sum(fids) / len(fids)
    sd = (sum((f - mean) ** 2 for f in fids) / max(1, len(fids) - 1)) ** 0.5
    path = save_metrics(Path(args.out_dir) / f"real-{rule}-n{args.num_samples}.json",
                        {"labels": rule, "num_samples": args.num_samples, "class_counts": counts.tolist(),
                         "fid_lenet_train": fids, "fid_mean": mean, "fid_sd": sd, "reference_split": REFERENCE_SPLIT,
                         "extractor_id": result["extractor_id"], "dataset_sha256": result["dataset_sha256"]})
    print(f"real train images, {rule} class counts, N = {args.num_samples}: FID {mean:.3f} ± {sd:.3f} "
          f"(sd over {len(fids)} draws): {path}", flush=True)


def score_model(loaded, prepared, args) -> None:
    """The model's FID at each seed with each label rule, the primary setting otherwise."""
    config = loaded.config
    shape = (config.model.in_channels, prepared.spec.image_size, prepared.spec.image_size)
    for seed in args.seeds:
        settings = primary_settings(config).override(num_samples=args.num_samples, seed=seed)
        tag = sampler_tag(settings.sampler, settings.steps, settings.guidance)
        for rule in args.labels:
            labels = _labels(rule, prepared, config.model.num_classes, args.num_samples, seed)
            start = time.perf_counter()
            images = torch.cat(list(generate_batches(loaded.denoiser, loaded.denoiser.schedule, shape, settings,
                                                     device=torch.device("cpu"), progress=False,
                                                     class_labels=labels)))
            images_per_s = len(images) / (time.perf_counter() - start)
            result = evaluate(images, labels=labels, data=config.data, tag=tag, seed=seed, bootstrap=args.bootstrap,
                              device="cpu", progress=False)
            result.update(labels=rule, class_counts=torch.bincount(labels).tolist(), model=str(args.model),
                          model_step=loaded.info.get("step"), sampler=settings.sampler, steps=settings.steps,
                          eta=settings.eta, spacing=settings.spacing, guidance=settings.guidance, seed=seed,
                          sampling_images_per_s=images_per_s, threads=torch.get_num_threads(),
                          matmul_gflops=matmul_gflops())
            path = save_metrics(Path(args.out_dir) / f"{rule}-n{args.num_samples}-seed{seed}.json", result)
            print(f"{rule} labels, N = {args.num_samples}, seed {seed}: FID {result[f'fid_lenet_{tag}']:.3f}, "
                  f"{images_per_s:.1f} images/s (fp32 matmul {result['matmul_gflops']:.0f} GFLOP/s): {path}",
                  flush=True)


if __name__ == "__main__":
    main()
