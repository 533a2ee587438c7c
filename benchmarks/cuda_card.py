"""The default preset on one GPU, through the project's own commands: training with bf16 autocast under
torchrun (NCCL), N = 10,000 scoring, and images/s with model FLOP utilisation against this run's matmul peaks.

    python benchmarks/cuda_card.py --out DIR [--seeds 0 1] [--budget-s 480] [--preset mnist-cpu-cond]
    python benchmarks/cuda_card.py --out DIR --device cpu --fp32 --train-steps 20 --eval-n 200   # a smoke run

Stages, each a subprocess whose output is kept in DIR/<stage>.log, in this order:
  card       the GPU (torch.cuda), torch, CUDA and NCCL versions, dense 8192³ matmul TFLOP/s in fp32, TF32 and bf16
  train-S    diffusion train --preset P --nproc-per-node 1 --set train.bf16=true --set train.seed=S
             (the preset's steps and batch: the same images as its CPU run), wall seconds and images/s
  eval-S     diffusion evaluate --model <run>/model -n 10000 --floors --bootstrap 20 --seed 0 at the preset's
             sampler and 50 steps (fp32 sampling), then at 20 steps
  speed-*    benchmarks/throughput.py: the training precision (bf16, or fp32 with --fp32) and fp32 at the
             preset's batch, the training precision at 1,024 and compiled
DIR/model-S holds each trained model (exported: safetensors + JSON), so a lent machine's models come back.
Each stage's log is written as it runs (`tail -f DIR/<stage>.log` shows its progress). A stage whose expected
length would end it past --budget-s (wall seconds from the start) is skipped and listed as such. DIR/card.json
gathers the numbers; model FLOP utilisation = training FLOPs per image (throughput.py's count, forward +
backward) × images/s ÷ the same run's matmul peak in the training precision.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVAL_N = 10_000
EVAL_STEPS = (50, 20)

CARD_PY = """
import json, sys, torch
from diffusion_core.runtime import matmul_gflops
device = sys.argv[1]
card = {"torch": torch.__version__, "cuda": torch.version.cuda, "matmul_tflops": {}}
if device == "cuda":
    p = torch.cuda.get_device_properties(0)
    card.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                nccl=".".join(map(str, torch.cuda.nccl.version())))
for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    n = 8192 if device == "cuda" else 1024
    card["matmul_tflops"][name] = max(matmul_gflops(device, dtype, n=n, repeats=20) for _ in range(3)) / 1000
torch.backends.cuda.matmul.allow_tf32 = False
print(json.dumps(card))
"""


class Stages:
    """Runs the stages in order within the wall-clock budget, keeping each one's log and seconds."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.budget_s, self.start = out, budget_s, time.perf_counter()
        self.card: dict = {"stages": {}, "skipped": [], "failed": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, name: str, cmd: list[str], expected_s: float) -> str | None:
        """The stage's output, or None when it was skipped (budget) or failed (exit status ≠ 0)."""
        if self.elapsed() + expected_s > self.budget_s:
            print(f"[{self.elapsed():6.0f} s] skip {name}: about {expected_s:.0f} s would pass the budget", flush=True)
            self.card["skipped"].append(name)
            return None
        log = self.out / f"{name}.log"
        shown = " ".join(arg if len(arg) < 80 else "<script>" for arg in cmd)
        print(f"[{self.elapsed():6.0f} s] {name} (log: {log}): {shown}", flush=True)
        began = time.perf_counter()
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(log, "w") as stream:  # written as the stage runs, so a stage cut short still leaves its log
            returncode = subprocess.run(cmd, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT).returncode
        seconds, output = time.perf_counter() - began, log.read_text()
        self.card["stages"][name] = {"seconds": round(seconds, 1), "returncode": returncode}
        self.save()
        if returncode != 0:
            print(f"[{self.elapsed():6.0f} s] {name} FAILED (exit {returncode}):\n{output[-3000:]}", flush=True)
            self.card["failed"].append(name)
            return None
        print(f"[{self.elapsed():6.0f} s] {name} done in {seconds:.0f} s", flush=True)
        return output

    def save(self) -> None:
        (self.out / "card.json").write_text(json.dumps(self.card, indent=1) + "\n")


def training_rates(run_dir: Path, batch_size: int) -> dict:
    """images/s of a run from its metrics.jsonl: the median report (warm-up excluded: the first report)."""
    reports = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["images_per_s"] for r in reports[1:]] or [reports[0]["images_per_s"]]
    return {"steps": reports[-1]["step"], "images": reports[-1]["step"] * batch_size,
            "images_per_s_median": round(statistics.median(rates), 1), "final_loss": reports[-1]["loss"]}


SPEED_FIELDS = {"images_per_s": r"training:\s+([\d.]+) images/s", "gflop_per_image": r"FLOPs per image:\s+([\d.]+)",
                "achieved_gflops": r"achieved:\s+([\d.]+)", "fraction_of_peak": r"fraction of matmul peak:\s+([\d.]+)%",
                "sampling_evals_per_s": r"sampling \(batch \d+\):\s+([\d.]+)", "first_step_s": r"compile\):\s+([\d.]+)"}


def parse_speed(text: str) -> dict:
    return {key: float(m.group(1)) for key, pattern in SPEED_FIELDS.items() if (m := re.search(pattern, text))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for card.json and the stage logs")
    parser.add_argument("--preset", default="mnist-cpu-cond")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--budget-s", type=float, default=480, help="wall seconds for all stages")
    parser.add_argument("--runs", default="runs/cuda-card", help="run folders (under the repository root)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--fp32", action="store_true", help="train without bf16 autocast")
    parser.add_argument("--train-steps", type=int, help="default: the preset's")
    parser.add_argument("--eval-n", type=int, default=EVAL_N, help="images scored (and floor set size)")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from diffusion_core import load_config

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(args.preset, environ={})
    batch = config.train.batch_size
    train_steps = args.train_steps or config.train.steps
    stages = Stages(out, args.budget_s)
    card = stages.card
    card.update(preset=args.preset, train_steps=train_steps, train_batch=batch, train_bf16=not args.fp32,
                device=args.device)
    py, cli = sys.executable, [sys.executable, "-m", "diffusion_core.cli"]

    text = stages.run("card", [py, "-c", CARD_PY, args.device], 60)
    if text is None:
        return
    card.update(json.loads(text.strip().splitlines()[-1]))
    precision = "fp32" if args.fp32 else "bf16"  # of training, and of the throughput stages that mirror it
    amp = [] if args.fp32 else ["--bf16"]

    def speed(name: str, flags: list[str], expected_s: float) -> None:
        text = stages.run(name, [py, "benchmarks/throughput.py", "--preset", args.preset, "--device", args.device,
                                 *flags], expected_s)
        if text is not None:
            card.setdefault("speed", {})[name] = parse_speed(text)

    def evaluate(seed: int, steps: int, expected_s: float, *extra: str) -> None:
        model = ROOT / args.runs / f"seed{seed}" / "model"
        stages.run(f"eval-{seed}-{steps}", [*cli, "evaluate", "--model", str(model), "--steps", str(steps),
                                            "-n", str(args.eval_n), "--device", args.device, *extra, "--bootstrap", "20",
                                            "--seed", "0", "--batch-size", "1000",
                                            "--out", str(out / f"seed{seed}-steps{steps}.json")], expected_s)

    train_s = 240.0  # until the first run says otherwise
    for i, seed in enumerate(args.seeds):
        run_dir = ROOT / args.runs / f"seed{seed}"
        trained = stages.run(f"train-{seed}", [*cli, "train", "--preset", args.preset, "--nproc-per-node", "1",
                                               "--no-resume", "--run-dir", str(run_dir), "--set", f"train.seed={seed}",
                                               "--set", f"train.steps={train_steps}", "--set", f"train.device={args.device}",
                                               "--set", f"train.bf16={str(not args.fp32).lower()}"], train_s)
        if trained is None:
            continue
        train_s = stages.card["stages"][f"train-{seed}"]["seconds"]
        shutil.copytree(run_dir / "model", out / f"model-seed{seed}", dirs_exist_ok=True)  # the exported model travels too
        rates = training_rates(run_dir, batch) | {"wall_s": train_s}
        card.setdefault("train", {})[str(seed)] = rates
        evaluate(seed, EVAL_STEPS[0], 120, "--floors")
        if i == 0:  # speed right after the first run, so a short budget still gets it
            speed(f"speed-{precision}", amp, 60)
            if amp:
                speed("speed-fp32", [], 60)
            speed(f"speed-{precision}-b1024", [*amp, "--batch-size", "1024"], 60)
            if f"speed-{precision}" in card.get("speed", {}):
                gflop = card["speed"][f"speed-{precision}"]["gflop_per_image"]
                peak_gflops = card["matmul_tflops"][precision] * 1000
                rates["model_flop_utilisation"] = rates["images_per_s_median"] * gflop / peak_gflops
        stages.save()
    for seed in args.seeds:
        if str(seed) in card.get("train", {}):
            for steps in EVAL_STEPS[1:]:
                evaluate(seed, steps, 90)
    speed(f"speed-{precision}-compiled", [*amp, "--compile"], 150)
    stages.save()
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()
