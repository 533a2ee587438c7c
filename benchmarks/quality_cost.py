"""Quality against cost in one figure, from the score files kept in benchmarks/results/ (nothing is sampled
or trained here): LeNet FID at N = 10,000 against the 10,000 test digits, left against network evaluations
per image (the teacher's samplers and the few-step students), right against training minutes (the recipes,
and the mnist-cpu recipe continued night after night).

    python benchmarks/quality_cost.py [--results benchmarks/results] [--plot docs/quality-cost.png]

Prints every point as a Markdown table with the file it comes from; docs/quality-cost.md names the command
behind each file. Training minutes are budgets, whatever the machine that ran them took: steps of 64 images
at 320 images/s for the presets' network, the calibration of docs/training-recipe.md (15 minutes = 4,500 steps),
and at its own measured 1.64× that for the 2×2-patch network (15 minutes = 7,380 steps).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SEED0 = "n10000/recipe-cond-seed0"  # the default preset, training seed 0 (test-split class mix); + sampler suffix
DEFAULT_SDE = "default (mnist-cpu-cond), SDE-DPM-Solver++(2M)"
DEFAULT_ODE = "default (mnist-cpu-cond), DPM-Solver++(2M) (ODE)"
# students of the default's seed-0 model, 2,900 steps of consistency distillation each (distillation seed 0, 1)
DEFAULT_CD_EPS = "few-step/default-consistency-eps-minsnr-2900.json"
DEFAULT_CD_EPS_SEED1 = "few-step/default-consistency-eps-minsnr-2900-seed1.json"
DEFAULT_CD_V = "few-step/default-consistency-v-2900.json"
# the same two ε-head students sampled at the preset's levels (log SNR −4.5, −1.5, 0.5 after T−1): `diffusion evaluate` files
DEFAULT_CD_EPS_LEVELS = ("few-step/default-consistency-eps-minsnr-2900-levels4.json",
                         "few-step/default-consistency-eps-minsnr-2900-seed1-levels4.json")
# students of the same model's ODE guided at w = 0.15 (distill.guidance, at distill.lr = 2e-4), 15 minutes
# (distillation seed 0, 1): `diffusion evaluate` files at their 4 levels and at 1 and 2 evaluations, learnt from
# 8 second-order teacher steps in 1,350 student steps with the squared error, and with the pseudo-Huber distance,
# half their levels at their sampler's own and the teacher's passes in bf16, 1,750 steps (the few-step preset's); the
# other guided students are in docs/quality-cost.md's table
DEFAULT_GUIDED_CD = {
    "consistency distillation of the default's ODE guided at 0.15, 8 2nd-order steps, 15 min":
        ("few-step/default-consistency-eps-minsnr-guided0.15-lr2e-4-ode8-order2-1350",
         "few-step/default-consistency-eps-minsnr-guided0.15-lr2e-4-ode8-order2-1350-seed1"),
    "the same, pseudo-Huber loss, half the levels at the sampler's own, bf16 teacher (the preset)":
        ("few-step/default-consistency-eps-minsnr-guided0.15-lr2e-4-ode8-order2-huber-focus0.5-bf16-1750",
         "few-step/default-consistency-eps-minsnr-guided0.15-lr2e-4-ode8-order2-huber-focus0.5-bf16-1750-seed1"),
}
COLORS = [f"C{k}" for k in range(10)] + ["black", "navy"]  # one per series of the left panel (12)
DEFAULT_ODE_GUIDED = "default (mnist-cpu-cond), DPM-Solver++(2M) (ODE), guidance 0.15"


@dataclass(frozen=True)
class Point:
    series: str
    x: float                # left panel: network evaluations per image; right panel: training minutes
    fid: float
    fid_std: float
    source: str
    seed: int = 0           # training seed (a student's: distillation seed); a line through seed 0, others hollow
    evaluations: int = 50   # right panel: the sampler's network evaluations per image


def _read(results: Path, name: str) -> dict:
    path = results / name
    if not path.is_file():
        raise SystemExit(f"{path} is missing: see docs/quality-cost.md for the command that makes it")
    return json.loads(path.read_text())


def _fid(score: dict, tag: str) -> tuple[float, float]:
    """FID and its standard error from a `diffusion evaluate --out` file, for sampler tag `tag` (dpmpp2msde50, …)."""
    return score[f"fid_lenet_{tag}"], score.get(f"fid_std_lenet_{tag}", 0.0)


def _scored(results: Path, name: str) -> tuple[float, float, int]:
    """FID, its standard error and the sampler's steps from a `diffusion evaluate --out` file that scored one
    DPM-Solver++ sampler at one guidance weight; a file with several (a guidance or steps sweep) is refused rather
    than read at random."""
    score = _read(results, name)
    tags = {k[len("fid_lenet_"):].split("_class")[0] for k in score if k.startswith("fid_lenet_dpmpp2m")}
    if len(tags) != 1:
        raise SystemExit(f"{results / name} scores {sorted(tags) or 'no'} DPM-Solver++ samplers; expected one")
    return (*_fid(score, tags.pop()), score["steps"])


def by_evaluations(results: Path) -> list[Point]:
    """Left panel: the teacher (four nights of mnist-cpu) with its SDE and ODE solvers and its students, and the
    default preset's model (mnist-cpu-cond, 15 minutes, training seed 0) with its SDE and ODE solvers and its
    students, the ε head also at the preset's levels, and its ODE guided at 0.15 with that ODE's students (hollow: a
    second distillation seed)."""
    points = []
    pd_name, cd_name = "few-step/progressive-v-1500.json", "few-step/consistency-v-2900.json"
    pd, cd = _read(results, pd_name), _read(results, cd_name)
    sweep_name = "quality-cost/teacher-nfe.json"
    sweep = _read(results, sweep_name)
    sde, ode = "teacher, SDE-DPM-Solver++(2M)", "teacher, DPM-Solver++(2M) (ODE)"
    points.append(Point(sde, 50, pd["teacher"]["fid"], pd["teacher"]["fid_std"], pd_name))
    for setting, series in (("dpm++2m-sde-4", sde), ("dpm++2m-4", ode), ("dpm++2m-50", ode)):
        score = pd["teacher_few_steps"][setting]
        points.append(Point(series, score["steps"], score["fid"], score["fid_std"], pd_name))
    for steps in (10, 20):
        points.append(Point(sde, steps, *_fid(sweep, f"dpmpp2msde{steps}"), sweep_name))
        points.append(Point(ode, steps, *_fid(sweep, f"dpmpp2m{steps}"), sweep_name))
    for doc, name, series, seed in (
            (pd, pd_name, "progressive distillation (of the teacher)", 0),
            (cd, cd_name, "consistency distillation (of the 60-min run)", 0),
            (_read(results, DEFAULT_CD_EPS), DEFAULT_CD_EPS, "consistency distillation of the default, ε head", 0),
            (_read(results, DEFAULT_CD_EPS_SEED1), DEFAULT_CD_EPS_SEED1, "consistency distillation of the default, ε head", 1),
            (_read(results, DEFAULT_CD_V), DEFAULT_CD_V, "consistency distillation of the default, v head", 0)):
        for steps, score in doc["student"].items():
            points.append(Point(series, int(steps), score["fid"], score["fid_std"], name, seed=seed))
    for seed, name in enumerate(DEFAULT_CD_EPS_LEVELS):
        score = _read(results, name)
        series = "consistency distillation of the default, ε head, at levels −4.5, −1.5, 0.5"
        points.append(Point(series, score["steps"], *_fid(score, f"consistency{score['steps']}_w0"), name, seed=seed))
    for series, stems in DEFAULT_GUIDED_CD.items():
        for seed, stem in enumerate(stems):
            for suffix in ("-steps1.json", "-steps2.json", "-levels4.json"):
                score = _read(results, stem + suffix)
                points.append(Point(series, score["steps"], *_fid(score, f"consistency{score['steps']}_w0"),
                                    stem + suffix, seed=seed))
    for name, series in ((f"{DEFAULT_SEED0}-ode20-guidance0.15.json", DEFAULT_ODE_GUIDED),
                         (f"{DEFAULT_SEED0}-sde10.json", DEFAULT_SDE), (f"{DEFAULT_SEED0}-sde15.json", DEFAULT_SDE),
                         (f"{DEFAULT_SEED0}-sde20.json", DEFAULT_SDE), (f"{DEFAULT_SEED0}-sde30.json", DEFAULT_SDE),
                         (f"{DEFAULT_SEED0}.json", DEFAULT_SDE),
                         (f"{DEFAULT_SEED0}-ode20.json", DEFAULT_ODE), (f"{DEFAULT_SEED0}-ode50.json", DEFAULT_ODE)):
        fid, fid_std, steps = _scored(results, name)
        points.append(Point(series, steps, fid, fid_std, name))
    return sorted(points, key=lambda p: (p.series, p.x))


def by_minutes(results: Path) -> list[Point]:
    """Right panel: one run per budget of mnist-cpu and mnist-cpu-cond (training seed 0, other seeds where kept),
    each scored at 50 evaluations, the default also at its own 20 and on 2×2 patches at equal time; and mnist-cpu
    continued night after night (the nightly week, each night's champion)."""
    week_name = "nightly/week.json"
    week = _read(results, week_name)
    one_run = "mnist-cpu, one run, 50 steps"
    cond50, cond20 = "mnist-cpu-cond (the default), one run, 50 steps", "mnist-cpu-cond (the default), one run, 20 steps"
    patch20 = "the default on 2×2 patches (model.patch_size = 2), 20 steps"
    points = [Point(one_run, 15, week["versions"]["1"]["fid"], week["versions"]["1"]["fid_std"],
                    f"{week_name} (night 1: trained fresh)")]
    for name, series, minutes, seed in (("quality-cost/mnist-cpu-5min.json", one_run, 5, 0),
                                        ("n10000/recipe-fast-seed2.json", one_run, 15, 2),
                                        ("quality-cost/mnist-cpu-cond-5min.json", cond50, 5, 0),
                                        (f"{DEFAULT_SEED0}.json", cond50, 15, 0),
                                        ("n10000/recipe-cond-seed1.json", cond50, 15, 1),
                                        ("quality-cost/mnist-cpu-cond-5min-sde20.json", cond20, 5, 0),
                                        (f"{DEFAULT_SEED0}-sde20.json", cond20, 15, 0),
                                        ("n10000/recipe-cond-seed1-sde20.json", cond20, 15, 1),
                                        ("quality-cost/mnist-cpu-cond-30min-sde20.json", cond20, 30, 0),
                                        ("quality-cost/mnist-cpu-cond-30min-seed1-sde20.json", cond20, 30, 1),
                                        ("quality-cost/mnist-cpu-cond-60min-sde20.json", cond20, 60, 0),
                                        ("quality-cost/mnist-cpu-cond-30min-sde50.json", cond50, 30, 0),
                                        ("quality-cost/mnist-cpu-cond-30min-seed1-sde50.json", cond50, 30, 1),
                                        ("n10000/cond-patch2-seed0-sde20.json", patch20, 15, 0),
                                        ("n10000/cond-patch2-seed1-sde20.json", patch20, 15, 1)):
        fid, fid_std, steps = _scored(results, name)
        points.append(Point(series, minutes, fid, fid_std, name, seed, steps))
    reference = _read(results, "nightly/reference.json")
    points.append(Point(one_run, 60, reference["fid"], reference["fid_std"], "nightly/reference.json"))
    for night in week["nights"]:
        champion = week["versions"][night["champion"]]
        points.append(Point("mnist-cpu, continued each night (nightly), 50 steps", 15 * night["night"], champion["fid"],
                            champion["fid_std"], week_name))
    return sorted(points, key=lambda p: (p.series, p.seed, p.x))


def floor(results: Path) -> float:
    """FID of 10,000 real training digits against the test digits."""
    return _read(results, f"{DEFAULT_SEED0}.json")["fid_lenet_train"]


def plot(left: list[Point], right: list[Point], floor_fid: float, teacher_fid: float, default_fid: float,
         png: Path) -> Path:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    from diffusion_core.figures import new_figure, save_png

    fig, (nfe, minutes) = new_figure(2, width_in=11.0, height_in=7.4)
    for ax, points, yticks in ((nfe, left, [2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]),
                               (minutes, right, [2, 3, 4, 6, 8, 10, 15, 20, 30, 40])):
        for k, series in enumerate(dict.fromkeys(p.series for p in points)):
            mine = [p for p in points if p.series == series and p.seed == 0]
            others = [p for p in points if p.series == series and p.seed != 0]
            style = dict(marker="os^vDP*Xh<>"[k % 11], capsize=3,
                         color=COLORS[k % len(COLORS)])  # a pair repeats after 132
            ax.errorbar([p.x for p in mine], [p.fid for p in mine], yerr=[p.fid_std for p in mine], label=series,
                        linestyle="-" if len(mine) > 1 else "none", **style)
            if others:
                ax.errorbar([p.x for p in others], [p.fid for p in others], yerr=[p.fid_std for p in others],
                            linestyle="none", markerfacecolor="none", **style)
        ax.axhline(floor_fid, color="0.3", linestyle="--", label=f"10,000 real training digits: {floor_fid:.2f}")
        ax.set_yscale("log")
        ax.set_yticks(yticks)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    nfe.axhline(1.5 * teacher_fid, color="C3", linestyle=":", label=f"1.5× the teacher at 50: {1.5 * teacher_fid:.1f}")
    nfe.axhline(1.5 * default_fid, color="C9", linestyle=":", label=f"1.5× the default at 50: {1.5 * default_fid:.1f}")
    nfe.set_xscale("log")
    nfe.set_xticks(sorted({p.x for p in left}))
    nfe.xaxis.set_major_formatter(ScalarFormatter())
    nfe.xaxis.set_minor_formatter(NullFormatter())
    nfe.set(xlabel="network evaluations per image", ylabel="LeNet FID, N = 10,000 (log scale)",
            title="sampling cost (teacher: mnist-cpu 60 min; default 15 min)")
    minutes.set(xlabel="training minutes (budget at each network's calibrated images/s)", ylabel="LeNet FID, N = 10,000 (log scale)",
                title="training cost (hollow: other training seeds)", xticks=[5, 15, 30, 45, 60])
    for ax in (nfe, minutes):  # below each panel, so that no line is hidden
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1)
    fig.suptitle("quality against cost on MNIST (2-core CPU runs)")
    return save_png(fig, png, rect=(0, 0, 1, 0.95))


def _fid_text(point: Point) -> str:
    return f"{point.fid:.2f} ± {point.fid_std:.2f}" if point.fid_std else f"{point.fid:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "quality-cost.png"))
    args = parser.parse_args()
    results = Path(args.results)
    left, right, floor_fid = by_evaluations(results), by_minutes(results), floor(results)
    teacher = next(p.fid for p in left if p.series.startswith("teacher, SDE") and p.x == 50)
    default = next(p.fid for p in left if p.series == DEFAULT_SDE and p.x == 50)
    print("| series | network evaluations | training minutes | training seed | FID at N = 10,000 | × floor | file |")
    print("|---|---|---|---|---|---|---|")
    for p in left:
        print(f"| {p.series} | {p.x:g} | | | {_fid_text(p)} | {p.fid / floor_fid:.2f} | {p.source} |")
    for p in right:
        print(f"| {p.series} | {p.evaluations} | {p.x:g} | {p.seed} | {_fid_text(p)} | {p.fid / floor_fid:.2f} | {p.source} |")
    print(f"plot: {plot(left, right, floor_fid, teacher, default, Path(args.plot))}")


if __name__ == "__main__":
    main()
