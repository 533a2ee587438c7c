"""Sample quality against sampling cost: FID per number of network evaluations (NFE) for DDIM,
DPM-Solver++(2M) and its SDE form, and optionally DDPM (all T steps), on one trained model with one
seed and N.

    python benchmarks/fid_vs_nfe.py --model runs/mnist-cpu -n 500 --nfe 10 20 50 100 [--ddpm] \
        [--samplers ddpm ddim dpm++2m dpm++2m-sde] [--merge earlier.json ...] [--out-json fid_vs_nfe.json] \
        [--plot docs/fid_vs_nfe.png]

Every sampler runs with its default timestep spacing (samplers.default_spacing: even in t for DDIM
with η = 0 and DDPM, even in log-SNR for both DPM-Solver++ forms), as the pipeline's `sample.nfe_sweep`.
`--merge` adds results of earlier `diffusion evaluate --out` runs of the same model, N and seed (e.g. the
~1,000× costlier DDPM run, made separately), after checking that they match. Prints a Markdown table; the plot is the evaluate flow's `fid_vs_nfe.png`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusion_core.checkpoint import load_model
from diffusion_core.distributed import DistContext, resolve_device
from diffusion_core.evaluation.evaluator import evaluate, sampler_tag, save_metrics
from diffusion_core.evaluation.plots import SAMPLER_LABELS, fid_by_nfe, plot_fid_vs_nfe

MATCHING = ("num_samples", "seed", "extractor_id", "dataset_sha256", "reference_split")  # must agree to merge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model folder, run folder or training checkpoint")
    parser.add_argument("-n", "--num-samples", type=int, default=500)
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100], help="network evaluations per image")
    parser.add_argument("--samplers", nargs="+", default=["ddim", "dpm++2m", "dpm++2m-sde"],
                        choices=["ddpm", "ddim", "dpm++2m", "dpm++2m-sde"],
                        help="ddpm here is ancestral sampling on the respaced chain of --nfe steps")
    parser.add_argument("--ddpm", action="store_true", help="also DDPM with all T steps (T evaluations per image)")
    parser.add_argument("--merge", nargs="*", default=[], help="metrics JSON files from `diffusion evaluate --out`")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-json", help="all metrics, merged, as JSON")
    parser.add_argument("--plot", help="PNG of FID against NFE")
    args = parser.parse_args()

    earlier = [json.loads(Path(path).read_text()) for path in args.merge]  # read before hours of sampling
    device = resolve_device(args.device, DistContext())
    loaded = load_model(args.model, device)
    runs = [(sampler, steps) for sampler in args.samplers for steps in args.nfe]
    if args.ddpm:
        runs.append(("ddpm", loaded.denoiser.schedule.timesteps))

    metrics: dict = {}
    seconds_per_image: dict[str, float] = {}
    for sampler, steps in runs:  # each with its sampler's default spacing
        result = evaluate(loaded, sampler=sampler, steps=steps, num_samples=args.num_samples,
                          seed=args.seed, device=device)
        seconds_per_image[sampler_tag(sampler, steps)] = 1 / result.pop("sampling_images_per_s")
        _merge(metrics, result, "this run")
        print(f"{sampler}-{steps}: FID {result[f'fid_lenet_{sampler_tag(sampler, steps)}']:.2f}", flush=True)
    for path, result in zip(args.merge, earlier):
        result.pop("sampling_images_per_s", None)
        _merge(metrics, result, path)

    print(f"\n{metrics['extractor_id']}, N = {metrics['num_samples']}, seed {metrics['seed']}, "
          f"vs the {metrics['reference_split']} split\n")
    print("| sampler | network evaluations | FID ↓ | KID ↓ | precision | recall | seconds per image |")
    print("|---|---|---|---|---|---|---|")
    for sampler, points in fid_by_nfe(metrics, "lenet").items():
        for steps, fid in points:
            tag = sampler_tag(sampler, steps)
            per_image = seconds_per_image.get(tag)
            print(f"| {SAMPLER_LABELS.get(sampler, sampler)} | {steps} | {fid:.1f} | {metrics[f'kid_lenet_{tag}']:.1f} "
                  f"| {metrics[f'precision_lenet_{tag}']:.3f} | {metrics[f'recall_lenet_{tag}']:.3f} "
                  f"| {'' if per_image is None else f'{per_image:.3f}'} |")
    if args.out_json:
        save_metrics(args.out_json, metrics)
    if args.plot and plot_fid_vs_nfe(metrics, "lenet", args.plot, metrics["num_samples"]):
        print(f"plot: {args.plot}")


def _merge(metrics: dict, result: dict, source: str) -> None:
    """Add `result` to `metrics`, refusing results made under a different protocol."""
    for key in MATCHING:
        if key in metrics and key in result and metrics[key] != result[key]:
            raise SystemExit(f"{source}: {key} = {result[key]!r} but the other results have {metrics[key]!r}; "
                             "merge only runs of the same model, N, seed and reference split")
    if result.get("sde_noise", 1.0) != 1.0:  # the tag dpmpp2msde<N> does not carry it: the table is at Lu et al.'s 1
        raise SystemExit(f"{source}: sde_noise = {result['sde_noise']} but this table's SDE points are at 1")
    # per-run fields: the metric names' tags carry sampler and steps, not eta, spacing or sde_noise (this script's
    # runs take each sampler's defaults; a merged file's sde_noise is checked above)
    for key in ("sampler", "steps", "eta", "spacing", "sde_noise"):
        result.pop(key, None)
    metrics.update(result)


if __name__ == "__main__":
    main()
