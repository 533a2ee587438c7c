"""A few-step student against its teacher: consistency or progressive distillation, scored at N images per setting.

    python benchmarks/few_step.py --teacher runs/mnist-cpu-hour [--distill-steps 2900] [--set distill.method=progressive] \
        [--nfe 1 2 4] [--teacher-nfe 4] [--teacher-ode-nfe 50] [-n 10000] [--work runs/few-step] \
        [--out benchmarks/results/few-step/NAME.json]

1. `diffusion distill --teacher <teacher>` with distill.steps=<distill-steps> (and any --set), timed.
2. The student scored by `diffusion evaluate -n <n>` with its own sampler (distill.method's) at each --nfe.
3. The teacher scored at its own setting (or read from --teacher-score, a `diffusion evaluate --out` JSON of
   it at the same n) and, at each --teacher-nfe, with DPM-Solver++(2M) in ODE and SDE form: what the same
   number of evaluations buys without distillation; at each --teacher-ode-nfe with the ODE form alone: the
   teacher's probability-flow ODE, which both distillations learn to jump along (so its FID bounds theirs).
Every score records its sampling images/s; the JSON carries the fp32 matmul GFLOP/s measured before
and after, beside every wall-clock figure. Run it on an otherwise idle machine (a second PyTorch job on the
same cores collapses both), which changes the times, never the models.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from diffusion_core.runtime import matmul_gflops

METRICS = ("fid", "fid_std", "precision", "recall", "confident_fraction")


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} exited with {proc.returncode}:\n{proc.stdout[-3000:]}")


def score(model: Path, n: int, out: Path, *flags: str) -> dict:
    """`diffusion evaluate` of `model` with `flags`: its primary metrics (names without the setting's tag)."""
    if not out.is_file():
        run(["diffusion", "evaluate", "--model", str(model), "-n", str(n), "--out", str(out), *flags])
    return summary(json.loads(out.read_text()))


def summary(document: dict) -> dict:
    setting = next(k[len("fid_lenet_"):] for k in document if k.startswith("fid_lenet_")
                   and not k.endswith(("_train", "_noise")) and "_class" not in k)
    out = {m: document.get(f"{m}_lenet_{setting}") for m in METRICS}
    return {**out, "sampler": document["sampler"], "steps": document["steps"], "num_samples": document["num_samples"],
            "images_per_s": document.get("sampling_images_per_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the trained model (run folder or exported model)")
    parser.add_argument("--teacher-score", help="`diffusion evaluate --out` JSON of the teacher at -n (skips scoring it)")
    parser.add_argument("--distill-steps", type=int, default=2900, help="distill.steps (2,900: 15 min at 210 images/s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4], help="the student's network evaluations")
    parser.add_argument("--teacher-nfe", type=int, nargs="*", default=[4], help="the teacher's few-step settings")
    parser.add_argument("--teacher-ode-nfe", type=int, nargs="*", default=[], help="the teacher's ODE (dpm++2m) alone")
    parser.add_argument("-n", "--num-samples", type=int, default=10000)
    parser.add_argument("--work", default="runs/few-step", help="the student's run folder and score files")
    parser.add_argument("--out", required=True, help="result JSON")
    args = parser.parse_args()
    work, teacher = Path(args.work), Path(args.teacher)
    work.mkdir(parents=True, exist_ok=True)
    peak_before = matmul_gflops()
    print(f"fp32 matmul {peak_before:.0f} GFLOP/s; {platform.processor() or platform.machine()}", flush=True)

    student = work / "student"
    started = time.perf_counter()
    if not (student / "model").is_dir():
        run(["diffusion", "distill", "--teacher", str(teacher), "--run-dir", str(student),
             "--set", f"distill.steps={args.distill_steps}", *[a for s in args.overrides for a in ("--set", s)]])
    distill_s = time.perf_counter() - started
    reports = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]

    n = args.num_samples
    students = {nfe: score(student / "model", n, work / f"student-{nfe}.json", "--steps", str(nfe)) for nfe in args.nfe}
    teacher_score = (summary(json.loads(Path(args.teacher_score).read_text())) if args.teacher_score
                     else score(teacher, n, work / "teacher.json"))
    few = {f"{sampler}-{nfe}": score(teacher, n, work / f"teacher-{sampler}-{nfe}.json", "--sampler", sampler,
                                     "--steps", str(nfe))
           for nfe in args.teacher_nfe for sampler in ("dpm++2m", "dpm++2m-sde")}
    few.update({f"dpm++2m-{nfe}": score(teacher, n, work / f"teacher-dpm++2m-{nfe}.json", "--sampler", "dpm++2m",
                                        "--steps", str(nfe)) for nfe in args.teacher_ode_nfe})
    document = {
        "teacher": {"path": str(teacher), **teacher_score},
        "teacher_few_steps": few,
        "distill": {"steps": args.distill_steps, "overrides": args.overrides, "wall_s": round(distill_s, 1),
                    "images_per_s": sum(r["images_per_s"] for r in reports) / len(reports),
                    "final_loss": reports[-1]["loss"]},
        "student": {str(k): v for k, v in students.items()},
        "student_to_teacher_fid": {str(k): v["fid"] / teacher_score["fid"] for k, v in students.items()},
        "matmul_gflops_fp32": {"before": round(peak_before, 1), "after": round(matmul_gflops(), 1)},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({k: document[k] for k in ("student_to_teacher_fid", "distill")}, indent=2))


if __name__ == "__main__":
    main()
