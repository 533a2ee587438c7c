"""Training-recipe ablation at equal wall-clock budget: train each arm for the same minutes of this
machine, then score every arm the same way.

    python benchmarks/recipe.py --arms baseline cosine-lr --minutes 5 [--preset mnist-cpu-v1] \
        [--sampler dpm++2m-sde --steps 50] [-n 1000] [--out-dir runs/recipe] [--plot docs/time-to-quality.png]
    python benchmarks/recipe.py --list                       # the arms and what each changes
    python benchmarks/recipe.py --report runs/recipe --plot docs/time-to-quality.png   # table + plot only

Budget: each arm first measures its own training images/s on this machine (the best of a few
timings of its network and batch; the fp32 matmul peak is recorded beside it, since this machine's
speed drifts by up to 2× between days), and is then trained for `minutes × 60 × images/s` images.
So the arms get equal time on the idle machine, and the comparison holds even when the arms are
trained later, side by side or on a busy machine. `--calibrate-only` measures every listed arm first
(on an idle machine); the figures are kept in `<out-dir>/calibration.json`.
An arm whose learning rate does not depend on the run's length (no decay) is trained once to the
longest budget and scored at each shorter one on the way (resuming is exact, so each stop equals a
separate run of that length); an arm with a decaying rate is a separate run per budget.

Score: N samples with the given sampler (default SDE-DPM-Solver++(2M), 50 steps, log-SNR spacing) at
sampling seeds 0 and 1: FID, KID, precision/recall in the LeNet classifier's features against the
test split, confident share and class entropy; FID's sampling noise is the spread between the two
seeds; the floor is N real train images against the same test split. One JSON per arm and budget
(`<out-dir>/<arm>-<minutes>min/score-<sampler><steps>.json`, beside the run's `training.json`), a Markdown
table of all of them. An arm trained before is only scored again when asked for with another sampler.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from diffusion_core import load_config, load_model, train
from diffusion_core.config import parse_override
from diffusion_core.checkpoint import build_denoiser
from diffusion_core.data import get_spec
from diffusion_core.evaluation.evaluator import compute_floors, evaluate, sampler_tag, save_metrics
from diffusion_core.figures import new_figure, save_png
from diffusion_core.runtime import matmul_gflops, tune_cpu_runtime
from diffusion_core.samplers import default_spacing

# mnist-cpu-cond's additions to a recipe: a class embedding, labels dropped 10 % of the time, sampled with w = 0.
RECIPE_COND = {"model.num_classes": 10, "train.label_dropout": 0.1, "sample.guidance": 0.0}
# The mnist-cpu preset's recipe as overrides on mnist-cpu-v1 (arm recipe-fast); the fast-* arms change one thing of it.
RECIPE_FAST = {"train.lr_decay": "cosine", "train.loss_weighting": "min_snr", "model.num_res_blocks": 1,
               "model.attention_levels": []}

# name → (what it changes, overrides on the preset). Each arm is one change, or the running winner
# plus one change, so its row reads as the effect of that change.
ARMS: dict[str, tuple[str, dict]] = {
    "baseline": ("the mnist-cpu recipe before this ablation (preset mnist-cpu-v1): LR 1e-3 constant after "
                 "200 warm-up steps, t uniform, ε target, EMA 0.995", {}),
    "cosine-lr": ("learning rate decays to 0 along half a cosine by the end of the run",
                  {"train.lr_decay": "cosine"}),
    "cosine-lr-2e-3": ("cosine-lr with peak LR 2e-3", {"train.lr_decay": "cosine", "train.lr": 2e-3}),
    "min-snr": ("cosine-lr + Min-SNR-5 loss weighting on the ε error",
                {"train.lr_decay": "cosine", "train.loss_weighting": "min_snr"}),
    "v-pred": ("cosine-lr + v target (ε error weighted by ᾱ, i.e. SNR/(SNR+1))",
               {"train.lr_decay": "cosine", "diffusion.prediction": "v"}),
    "lognormal-t": ("cosine-lr + t drawn with log SNR ~ N(2.4, 2.4²) (EDM's noise levels)",
                    {"train.lr_decay": "cosine", "train.noise_levels": "log_snr_normal"}),
    "power-ema": ("cosine-lr + power-function EMA, relative length 0.10 (EDM2)",
                  {"train.lr_decay": "cosine", "train.ema_std": 0.10}),
    "one-block": ("cosine-lr + one residual block per level (more images per minute)",
                  {"train.lr_decay": "cosine", "model.num_res_blocks": 1}),
    "batch-128": ("cosine-lr + batch 128, peak LR 1.4e-3 (√2 × 1e-3)",
                  {"train.lr_decay": "cosine", "train.batch_size": 128, "train.lr": 1.4e-3}),
    "no-attention": ("cosine-lr + no self-attention at 7×7 (the middle block keeps its own)",
                     {"train.lr_decay": "cosine", "model.attention_levels": []}),
    "cosine-schedule": ("cosine-lr + the cosine noise schedule (Nichol & Dhariwal 2021) for training and sampling",
                        {"train.lr_decay": "cosine", "diffusion.schedule": "cosine"}),
    "recipe": ("cosine-lr + Min-SNR-5 + one residual block per level",
               {"train.lr_decay": "cosine", "train.loss_weighting": "min_snr", "model.num_res_blocks": 1}),
    "recipe-fast": ("the mnist-cpu preset's recipe: cosine-lr + Min-SNR-5 + fast-net's network (one block per "
                    "level, no attention at 7×7)", RECIPE_FAST),
    "fast-lr-2e-3": ("recipe-fast with peak LR 2e-3", {**RECIPE_FAST, "train.lr": 2e-3}),
    "fast-cosine-schedule": ("recipe-fast with the cosine noise schedule (Nichol & Dhariwal 2021) for training and "
                             "sampling: 5 % of t below log SNR −5 instead of the linear schedule's 30 %",
                             {**RECIPE_FAST, "diffusion.schedule": "cosine"}),
    "fast-cosine-lr-2e-3": ("recipe-fast with both candidates: the cosine noise schedule and peak LR 2e-3",
                            {**RECIPE_FAST, "diffusion.schedule": "cosine", "train.lr": 2e-3}),
    "fast-bf16": ("recipe-fast trained under bfloat16 autocast (weights, Adam and EMA stay fp32); worth it only "
                  "on CPUs with AMX or AVX512-BF16, where the same images take less time",
                  {**RECIPE_FAST, "train.bf16": True}),
    "recipe-cond": ("the mnist-cpu-cond preset (the default): recipe-fast with class labels (label dropout 0.1), "
                    "scored with the test split's class mix and no guidance", {**RECIPE_FAST, **RECIPE_COND}),
    "cond-patch2": ("recipe-cond on 2×2 patches: the image enters as 14×14×4 (space-to-depth), so the network "
                    "runs 14 → 7 at 32 / 64 channels, recipe-cond's two lower levels, and skips the 28×28 level",
                    {**RECIPE_FAST, **RECIPE_COND, "model.patch_size": 2, "model.base_channels": 32,
                     "model.channel_mults": [1, 2]}),
    "cond-batch32": ("recipe-cond with batches of 32: more optimizer steps for the images the same time buys",
                     {**RECIPE_FAST, **RECIPE_COND, "train.batch_size": 32}),
    "cond-stratified-t": ("recipe-cond with stratified noise levels: each batch of 64 holds one t in each 1/64 "
                          "of p(t) (VDM's low-discrepancy draw), for a steadier loss at the same cost",
                          {**RECIPE_FAST, **RECIPE_COND, "train.stratified_noise_levels": True}),
    "fast-net": ("cosine-lr + one residual block per level and no attention at 7×7 (middle block keeps its own)",
                 {"train.lr_decay": "cosine", "model.num_res_blocks": 1, "model.attention_levels": []}),
}


PLOT_LABELS = {"baseline": "previous recipe (mnist-cpu-v1)", "recipe": "cosine LR + Min-SNR + one block",
               "recipe-fast": "new recipe (mnist-cpu; mnist-cpu-hour at 60 min)",
               "fast-lr-2e-3": "new recipe, peak LR 2e-3 (one seed)",
               "fast-cosine-schedule": "new recipe, cosine noise schedule (training seed 0 of 4)",
               "fast-cosine-lr-2e-3": "new recipe, cosine schedule + peak LR 2e-3 (one seed)",
               "recipe-cond": "new recipe with class labels (mnist-cpu-cond, the default)"}


def training_images_per_s(config, clock=time.perf_counter, warmup: int = 3, steps: int = 6,
                          repeats: int = 5) -> float:
    """Images/s of full training steps (forward, backward, AdamW) of the config's network and batch:
    the best of `repeats` timings by `clock`, since anything else running only slows a timing down."""
    tune_cpu_runtime()
    torch.manual_seed(0)
    denoiser = build_denoiser(config)
    optimizer = torch.optim.AdamW(denoiser.net.parameters(), lr=1e-4, fused=True)
    spec = get_spec(config.data.dataset)
    x0 = torch.rand(config.train.batch_size, spec.channels, spec.image_size, spec.image_size) * 2 - 1

    def step() -> None:
        t = torch.randint(0, denoiser.schedule.timesteps, (len(x0),))
        loss = denoiser.loss(x0, t, torch.randn_like(x0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        for _ in range(steps):
            step()
        best = min(best, clock() - start)
    return steps * len(x0) / best


def one_thread_cpu_images_per_s(config) -> float:
    """Training images per CPU-second on one thread, timed by the thread's own CPU clock: a figure that
    other processes on the machine barely move (they take turns on the core, not this thread's time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return training_images_per_s(config, clock=time.thread_time)
    finally:
        torch.set_num_threads(threads)


def calibration(config, out_dir: Path, estimate_from_cpu_time: bool = False) -> tuple[float, float]:
    """(training images/s on the idle machine, fp32 matmul GFLOP/s) of a network and batch size, kept in
    `<out-dir>/calibration.json` under that network and batch: arms that differ only in what a step
    computes with the same tensors (noise levels, weighting, learning rate, EMA) share one figure, and
    arms trained later or side by side use the idle machine's figures.

    The idle figure is measured (wall clock, all threads) when the table has none. For another network
    measured while the machine is busy, pass `estimate_from_cpu_time` (`--estimate-from-cpu-time`): its figure is then its
    one-thread CPU-time rate times the wall/CPU ratio of a network with both figures in the table."""
    key = json.dumps({"model": config.to_dict()["model"], "batch_size": config.train.batch_size}, sort_keys=True)
    path = out_dir / "calibration.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    entry = table.setdefault(key, {})
    if "images_per_s" not in entry:
        entry["matmul_gflops"] = matmul_gflops()
        reference = next((e for e in table.values() if "images_per_s" in e and "cpu_images_per_s" in e), None)
        if estimate_from_cpu_time and reference is not None:
            entry["cpu_images_per_s"] = one_thread_cpu_images_per_s(config)
            entry["images_per_s"] = entry["cpu_images_per_s"] * reference["images_per_s"] / reference["cpu_images_per_s"]
            entry["estimated_from_cpu_time"] = True
        else:
            entry.update(images_per_s=training_images_per_s(config), threads=torch.get_num_threads())
        save_metrics(path, table)
    if "cpu_images_per_s" not in entry:
        entry["cpu_images_per_s"] = one_thread_cpu_images_per_s(config)
        save_metrics(path, table)
    return entry["images_per_s"], entry["matmul_gflops"]


def score_name(sampler: str, steps: int) -> str:
    """An arm's score file for one sampler: `score-dpmpp2msde50.json`; each sampler's scores sit side by side."""
    return f"score-{sampler_tag(sampler, steps)}.json"


def score(model_dir: Path, args, floors: dict, guidance: float | None = None) -> dict:
    """The arm's metrics at sampling seeds 0 and 1, with FID's seed spread and the floor at this N; a
    class-conditional arm's samples are drawn for the test split's class mix (evaluate(): protocol.scoring_labels)
    at guidance weight `guidance`."""
    loaded = load_model(model_dir)
    spacing = default_spacing(args.sampler)
    tag = sampler_tag(args.sampler, args.steps, guidance)
    runs = [evaluate(loaded, num_samples=args.num_samples, sampler=args.sampler, steps=args.steps,
                     spacing=spacing, seed=seed, guidance=guidance, progress=False) for seed in (0, 1)]
    fids = [r[f"fid_lenet_{tag}"] for r in runs]
    floor = floors["fid_lenet_train"]
    out = {"sampler": args.sampler, "sampler_steps": args.steps, "spacing": spacing, "num_samples": args.num_samples,
           "guidance": guidance,
           "fid": sum(fids) / 2, "fid_seed_spread": abs(fids[0] - fids[1]), "fid_floor": floor,
           "fid_x_floor": sum(fids) / 2 / floor, "sampling_images_per_s": runs[0]["sampling_images_per_s"]}
    for key in ("kid", "precision", "recall", "confident_fraction", "class_entropy"):
        out[key] = sum(r[f"{key}_lenet_{tag}"] for r in runs) / 2
    return out


def run_arm(name: str, args, floors: dict) -> list[dict]:
    description, overrides = ARMS[name]
    overrides = {**overrides, **dict(parse_override(o) for o in args.set)}
    config = load_config(args.preset, overrides)
    if args.images_per_s:  # a budget given in images/s (another machine's calibration), not measured here
        rate, peak = args.images_per_s, matmul_gflops()
    else:
        rate, peak = calibration(config, Path(args.out_dir), args.estimate_from_cpu_time)
    print(f"[{name}] {rate:.1f} training images/s (fp32 matmul peak {peak:.0f} GFLOP/s): {description}",
          flush=True)
    budgets = sorted(args.minutes)
    extendable = config.train.lr_decay == "none"  # a stop on the way equals a separate run of that length
    results = []
    for minutes in budgets:
        steps = max(1, round(minutes * 60 * rate / config.train.batch_size))
        run_dir = Path(args.out_dir) / (f"{name}-run" if extendable else f"{name}-{minutes:g}min")
        out_dir = Path(args.out_dir) / f"{name}-{minutes:g}min"
        score_file = out_dir / score_name(args.sampler, args.steps)
        if score_file.is_file():  # scored before with this sampler: keep it (delete the file to redo)
            results.append(json.loads(score_file.read_text()))
            continue
        model_dir = out_dir / "model"
        training_file = out_dir / "training.json"
        if training_file.is_file():  # trained before (scored with another sampler): score the same model
            training = json.loads(training_file.read_text())
        else:
            config_m = load_config(args.preset, {**overrides, "train.steps": steps, "train.checkpoint_every": steps})
            start = time.perf_counter()
            trained = train(config_m, run_dir, progress=not args.quiet)
            wall = time.perf_counter() - start
            if extendable:  # keep this stop's model: the run folder's export moves on with the next budget
                shutil.copytree(run_dir / "model", model_dir, dirs_exist_ok=True)
            training = {"arm": name, "description": description, "overrides": overrides, "minutes": minutes,
                        "steps": steps, "batch_size": config.train.batch_size,
                        "images_seen": steps * config.train.batch_size, "calibrated_images_per_s": rate,
                        "matmul_gflops": peak, "train_wall_s_this_call": wall, "final_loss": trained.final_loss}
            save_metrics(training_file, training)
        result = {**training, **score(model_dir, args, floors, config.sample.guidance if config.conditional else None)}
        save_metrics(score_file, result)
        results.append(result)
        print(f"[{name} {minutes:g} min] {steps} steps, FID {result['fid']:.2f} ± {result['fid_seed_spread']:.2f} "
              f"= {result['fid_x_floor']:.2f}× floor, confident {result['confident_fraction']:.3f}, "
              f"entropy {result['class_entropy']:.3f}", flush=True)
    return results


def table(results: list[dict]) -> str:
    head = ("| arm | min | images/s | images seen | FID (seed spread) | × floor | KID | precision | recall "
            "| confident | entropy |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [f"| {r['arm']} | {r['minutes']:g} | {r['calibrated_images_per_s']:.0f} | {r['images_seen']:,} "
            f"| {r['fid']:.2f} ({r['fid_seed_spread']:.2f}) | {r['fid_x_floor']:.2f} | {r['kid']:.4f} "
            f"| {r['precision']:.3f} | {r['recall']:.3f} | {r['confident_fraction']:.3f} | {r['class_entropy']:.3f} |"
            for r in sorted(results, key=lambda r: (r["minutes"], r["fid"]))]
    return "\n".join([head, *rows])


def plot(results: list[dict], png: Path, arms: list[str]) -> None:
    """FID × floor and confident share against training minutes, one line per arm."""
    import matplotlib.ticker

    fig, (ax_fid, ax_conf) = new_figure(2, width_in=10, height_in=3.8)
    for arm in arms:
        rows = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["minutes"])
        if not rows:
            continue
        minutes = [r["minutes"] for r in rows]
        label = PLOT_LABELS.get(arm, arm)
        ax_fid.errorbar(minutes, [r["fid_x_floor"] for r in rows],
                        yerr=[r["fid_seed_spread"] / r["fid_floor"] for r in rows], marker="o", capsize=3, label=label)
        ax_conf.plot(minutes, [r["confident_fraction"] for r in rows], marker="o", label=label)
    ax_fid.axhline(2.0, color="grey", ls="--", lw=0.8)
    ax_fid.set(xlabel="training minutes (2-core CPU)", ylabel="LeNet FID ÷ real-data floor", yscale="log",
               title="FID (N = 1,000; bar: sampling-seed spread)")
    ax_fid.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_fid.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_fid.set_yticks([1, 2, 3, 5, 10, 20])
    ax_conf.axhline(0.9, color="grey", ls="--", lw=0.8)
    ax_conf.set(xlabel="training minutes (2-core CPU)", ylabel="share classified with > 0.9 confidence",
                title="confident samples")
    for ax in (ax_fid, ax_conf):
        ax.grid(alpha=0.3)
    fig.legend(*ax_conf.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    save_png(fig, png, rect=(0, 0.1, 1, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="*", default=[], choices=sorted(ARMS))
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0], help="training budget(s) per arm")
    parser.add_argument("--preset", default="mnist-cpu-v1", help="the preset every arm starts from (the recipe before the ablation)")
    parser.add_argument("--set", action="append", default=[], help="section.field=value for every arm")
    parser.add_argument("--sampler", default="dpm++2m-sde")
    parser.add_argument("--steps", type=int, default=50,
                        help="sampler steps (network evaluations per image; 50 as in the mnist-cpu preset)")
    parser.add_argument("-n", "--num-samples", type=int, default=1000)
    parser.add_argument("--out-dir", default="runs/recipe")
    parser.add_argument("--report", help="only print the table (and plot) of the scores under this folder")
    parser.add_argument("--plot", help="time-to-quality PNG")
    parser.add_argument("--plot-arms", nargs="+", default=None, help="arms drawn in the plot (default: all)")
    parser.add_argument("--list", action="store_true", help="list the arms")
    parser.add_argument("--estimate-from-cpu-time", action="store_true",
                        help="calibrate a new network on a busy machine from its one-thread CPU time (see calibration())")
    parser.add_argument("--images-per-s", type=float,
                        help="budget every arm at this many training images/s instead of measuring this machine "
                             "(e.g. 320, the mnist-cpu network's calibration in docs/training-recipe.md, for its image budgets)")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="only measure each arm's training images/s (run on an idle machine, before the arms)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    if args.list:
        for name, (description, overrides) in ARMS.items():
            print(f"{name:20s} {description}\n{'':20s} {overrides}")
        return

    if not args.report:
        config = load_config(args.preset)
        floors_file = Path(args.out_dir) / f"floors-n{args.num_samples}.json"
        if floors_file.is_file():
            floors = json.loads(floors_file.read_text())
        else:
            floors = compute_floors(config.data, num_samples=args.num_samples, progress=False)
            save_metrics(floors_file, floors)
        print(f"real-data floor at N = {args.num_samples}: FID {floors['fid_lenet_train']:.2f}, "
              f"confident {floors['confident_fraction_lenet_train']:.3f}, "
              f"entropy {floors['class_entropy_lenet_train']:.3f}", flush=True)
        for name in args.arms:
            if args.calibrate_only:
                calibration(load_config(args.preset, {**ARMS[name][1], **dict(parse_override(o) for o in args.set)}),
                            Path(args.out_dir), args.estimate_from_cpu_time)
            else:
                run_arm(name, args, floors)
        if args.calibrate_only:
            print(Path(args.out_dir, "calibration.json").read_text())
            return
    folder = Path(args.report or args.out_dir)
    results = [json.loads(p.read_text()) for p in sorted(folder.glob(f"*/{score_name(args.sampler, args.steps)}"))]
    sizes = ", ".join(f"{n:,}" for n in sorted({r["num_samples"] for r in results}))
    print(f"{args.sampler}, {args.steps} steps, N = {sizes or 'no scores'}:")
    print(table(results))
    if args.plot:
        plot(results, Path(args.plot), args.plot_arms or sorted({r["arm"] for r in results}))


if __name__ == "__main__":
    main()
