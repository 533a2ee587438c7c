"""How many samples, and which statistic, make a champion decision mean something.

    python benchmarks/eval_noise.py --models runs/evalnoise/steps1000 runs/evalnoise/steps2000 \
        [--preset mnist-cpu] [--seeds 5] [-n 64 250 1000 2000] [--out runs/evalnoise/noise.json]

Each model is sampled with the preset's primary setting (sampler, steps, spacing) at `--seeds`
sampling seeds, max(n) images per seed; every n scores the first n images of each seed's set (so the
seeds give independent evaluations at every n). Per model and n: FID's mean over seeds and its
seed-to-seed standard deviation (the real noise of one evaluation), the mean bootstrap fid_std that
one evaluation reports about itself (the pipeline's estimate of that noise), KID with torch-fidelity's
kid_std, and the confident share. Per pair of models and n: the gap in units of the combined
seed-to-seed noise, and what the pipeline's rule (promote when the FID gap exceeds
k·√(σ_a² + σ_b²), k = the project's default gate rule (flows.gate.DEFAULT_RULE), σ = each evaluation's own fid_std)
decides over every pairing of one evaluation of each model: right, wrong or kept; and for the same
model against itself (pairs of its seeds), how often it would promote a model over itself. Paired: both
models are sampled from the same seeds (the same starting noise and, for stochastic samplers, the same
noise along the way), so the spread over seeds of the per-seed gap FID_a(s) − FID_b(s) is the noise of a
comparison of two evaluations made with one seed, as the gate's protocol makes them (`sample.seed`).
Per pair, N and seed, the gate's own estimate of that noise, σ_gap (the paired bootstrap of the gap,
diffusion_core.evaluation.fid_gap_std), beside the SD it estimates, and what the paired rule (promote when
the gap exceeds k·σ_gap) decides for each seed.
Wall-clock figures are printed beside this machine's fp32 matmul peak, measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from pathlib import Path

import torch

from diffusion_core import load_config, load_model
from diffusion_core.data import get_spec
from diffusion_core.evaluation import evaluate
from diffusion_core.evaluation.evaluator import fid_gap_std
from diffusion_core.runtime import matmul_gflops, tune_cpu_runtime
from diffusion_core.samplers import generate_batches
from flows.gate import DEFAULT_RULE

METRICS = ("fid", "fid_std", "kid", "kid_std", "confident_fraction")


def sample_sets(loaded, settings, seeds: int, count: int) -> list[torch.Tensor]:
    """`seeds` independent uint8 sample sets of `count` images (sampling seeds 0 … seeds−1)."""
    spec = get_spec(loaded.config.data.dataset)
    shape = (spec.channels, spec.image_size, spec.image_size)
    return [torch.cat(list(generate_batches(loaded.denoiser, loaded.denoiser.schedule, shape,
                                            settings.override(seed=seed, num_samples=count), device="cpu",
                                            progress=True)))
            for seed in range(seeds)]


def score(images: torch.Tensor, data, bootstrap: int, seed: int) -> dict[str, float]:
    result = evaluate(images, data=data, tag="s", bootstrap=bootstrap, seed=seed, device="cpu", progress=False)
    return {metric: result[f"{metric}_lenet_s"] for metric in METRICS}


def decisions(champions: list[dict], candidates: list[dict], sigmas: float) -> dict[str, float]:
    """Over every (champion evaluation, candidate evaluation) pairing: share promoted and not."""
    promoted = [champion["fid"] - candidate["fid"] > sigmas * math.hypot(champion["fid_std"], candidate["fid_std"])
                for champion, candidate in itertools.product(champions, candidates)]
    return {"promoted": sum(promoted) / len(promoted), "pairings": len(promoted)}


def paired_rows(sets: dict[str, list[torch.Tensor]], sizes: list[int], data, bootstrap: int) -> list[dict]:
    """Per pair of models, N and sampling seed: σ_gap, the paired bootstrap standard error of the gap
    between the two models' sets drawn from that seed."""
    rows = []
    for a, b in itertools.combinations(sets, 2):
        for n in sizes:
            for seed, (images_a, images_b) in enumerate(zip(sets[a], sets[b])):
                rows.append({"pair": [a, b], "n": n, "seed": seed, "gap_std": fid_gap_std(
                    images_a[:n], images_b[:n], data=data, bootstrap=bootstrap, seed=seed, device="cpu")})
    return rows


def summarise_paired(rows: list[dict], paired: list[dict], sigmas: float) -> str:
    """The gate's paired estimate against the per-seed gap's real spread, and its decisions per seed."""
    fid = {(row["model"], row["n"], row["seed"]): row for row in rows}
    lines = ["", f"The paired rule (promote when the gap exceeds k·σ_gap, k = {sigmas:g}), one decision per seed "
             "(both models sampled from it, as under the gate):", "",
             "| pair | N | mean gap | SD of the gap over seeds | σ_gap (mean) | ratio | unpaired √(σ_a² + σ_b²) (mean) | "
             "better replaces worse | worse replaces better |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for row in paired:
        groups.setdefault((*row["pair"], row["n"]), []).append(row)
    for (a, b, n), group in groups.items():
        gaps = [fid[(a, n, g["seed"])]["fid"] - fid[(b, n, g["seed"])]["fid"] for g in group]  # FID_a − FID_b
        sd = statistics.stdev(gaps)
        sigma = statistics.mean(g["gap_std"] for g in group)
        unpaired = statistics.mean(math.hypot(fid[(a, n, g["seed"])]["fid_std"], fid[(b, n, g["seed"])]["fid_std"])
                                   for g in group)
        sign = 1 if statistics.mean(gaps) > 0 else -1  # +: b is the better model
        right = statistics.mean(sign * gap > sigmas * g["gap_std"] for gap, g in zip(gaps, group))
        wrong = statistics.mean(-sign * gap > sigmas * g["gap_std"] for gap, g in zip(gaps, group))
        lines.append(f"| {Path(a).name} / {Path(b).name} | {n} | {statistics.mean(gaps):+.2f} | {sd:.2f} | {sigma:.2f} | "
                     f"{sigma / sd if sd else math.inf:.2f} | {unpaired:.2f} | {right:.0%} | {wrong:.0%} |")
    return "\n".join(lines)


def summarise(rows: list[dict], models: list[str], sizes: list[int], sigmas: float) -> str:
    by: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        by.setdefault((row["model"], row["n"]), []).append(row)
    lines = ["| model | N | FID mean | FID seed SD | bootstrap fid_std (mean) | ratio | KID mean | KID seed SD | "
             "kid_std (mean) | confident |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, n in itertools.product(models, sizes):
        group = by[(model, n)]
        fid = [g["fid"] for g in group]
        sd = statistics.stdev(fid)
        boot = statistics.mean(g["fid_std"] for g in group)
        kid = [g["kid"] for g in group]
        lines.append(f"| {Path(model).name} | {n} | {statistics.mean(fid):.2f} | {sd:.2f} | {boot:.2f} | "
                     f"{boot / sd:.2f} | {statistics.mean(kid):.3g} | {statistics.stdev(kid):.2g} | "
                     f"{statistics.mean(g['kid_std'] for g in group):.2g} | "
                     f"{statistics.mean(g['confident_fraction'] for g in group):.3f} |")
    lines += ["", f"Decisions by the rule (k = {sigmas:g}), over every pairing of one evaluation of each model:", "",
              "| pair | N | FID gap / combined seed SD | paired: SD of the gap over seeds | gap / paired SD | "
              "better replaces worse | worse replaces better | model replaces itself |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for a, b in itertools.combinations(models, 2):
        for n in sizes:
            ga, gb = by[(a, n)], by[(b, n)]
            ma, mb = statistics.mean(g["fid"] for g in ga), statistics.mean(g["fid"] for g in gb)
            better, worse = (ga, gb) if ma < mb else (gb, ga)
            gap = abs(ma - mb) / math.hypot(statistics.stdev(g["fid"] for g in ga), statistics.stdev(g["fid"] for g in gb))
            # the same sampling seed gives both models the same starting noise: how much less the gap varies
            paired_sd = statistics.stdev(x["fid"] - y["fid"] for x, y in zip(ga, gb))
            right = decisions(worse, better, sigmas)["promoted"]
            wrong = decisions(better, worse, sigmas)["promoted"]
            itself = statistics.mean(decisions([x], [y], sigmas)["promoted"]
                                     for group in (ga, gb) for x, y in itertools.permutations(group, 2))
            lines.append(f"| {Path(a).name} / {Path(b).name} | {n} | {gap:.1f} | {paired_sd:.2f} | "
                         f"{abs(ma - mb) / paired_sd if paired_sd else math.inf:.1f} | {right:.0%} | {wrong:.0%} | "
                         f"{itself:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="model or run folders")
    parser.add_argument("--preset", default="mnist-cpu", help="the sampling and evaluation settings to measure")
    parser.add_argument("--seeds", type=int, default=5, help="independent evaluations per model and N")
    parser.add_argument("-n", type=int, nargs="+", default=[64, 250, 1000, 2000], help="sample counts")
    parser.add_argument("--out", default="runs/evalnoise/noise.json")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: the seed-to-seed spread is the quantity measured")
    tune_cpu_runtime()
    config = load_config(args.preset)
    settings = config.sample.resolved(config.diffusion.timesteps)
    sizes = sorted(args.n)
    print(f"fp32 matmul peak {matmul_gflops():.0f} GFLOP/s; {settings.sampler}-{settings.steps} "
          f"({settings.spacing}), seeds 0…{args.seeds - 1}, N = {sizes}, bootstrap {config.evaluation.bootstrap}")
    rows, sets_by_model = [], {}
    for model in args.models:
        loaded = load_model(model, "cpu")
        start = time.perf_counter()
        sets = sample_sets(loaded, settings, args.seeds, sizes[-1])
        sampled = time.perf_counter() - start
        data = loaded.config.data
        sets_by_model[model] = sets
        for seed, images in enumerate(sets):
            for n in sizes:
                rows.append({"model": model, "n": n, "seed": seed,
                             **score(images[:n], data, config.evaluation.bootstrap, seed)})
        print(f"{model}: sampled {args.seeds} × {sizes[-1]} in {sampled:.0f} s, scored in "
              f"{time.perf_counter() - start - sampled:.0f} s (fp32 matmul peak {matmul_gflops():.0f} GFLOP/s)")
    paired = paired_rows(sets_by_model, sizes, data, config.evaluation.bootstrap)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"preset": args.preset, "rows": rows, "paired": paired,
                                          "matmul_gflops_fp32": round(matmul_gflops(), 1)}, indent=1))
    print(summarise(rows, args.models, sizes, DEFAULT_RULE.sigmas))
    print(summarise_paired(rows, paired, DEFAULT_RULE.sigmas))


if __name__ == "__main__":
    main()
