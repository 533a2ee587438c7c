"""A simulated week of nightly retrains through the real deployment, against one uninterrupted run.

    python benchmarks/nightly_week.py [--nights 4] [--night-steps 4500] [--reference-steps 18000] \
        [--num-samples 10000] [--work /tmp/nightly-week] [--out benchmarks/results/nightly]

Phases (reference, week and the arms each write their JSON into --out and are skipped when that file exists,
so an interrupted week goes on where it stopped; the training itself resumes from its run folder; rejudge,
plot and lineage always run):
  reference  `diffusion train --preset mnist-cpu --set train.steps=<reference-steps>` (18,000 steps is the
             mnist-cpu-hour recipe), scored with `diffusion evaluate -n <num-samples>` → reference.json
  week       the local stack (infra/stack.sh, fresh state on free ports, data from $DIFFUSION_DATA_SOURCE)
             and <nights> runs of `prefect deployment run train-eval/nightly` back to back with
             preset=mnist-cpu, policy=continue and train.steps=<night-steps> (the first night has no
             champion and trains fresh; each later one continues the training head of the champion's line under the
             preset's continuation recipe: train.continue_schedule "constant", train.continue_ema_std 0.1).
             Per night: the flow run's state and duration, the new version and the gate's decision, the
             champion's version, its FID under the gate (N = the preset's evaluation.num_samples) and its
             lineage. Every night's champion and the last night's new version (the training head, which the
             gate may have kept out) are scored at <num-samples> → week.json (its fid: the last champion's;
             gate_rule, gate_continuation: the registered model's rule after the last night)
  constant   the same nights 2… by `diffusion train --continue-from` from night 1's training state with
             train.continue_schedule=constant and the run's fixed EMA (train.continue_ema_std=0), scored at
             <num-samples> → constant.json
  power-ema  the same with EDM2's power-function EMA (train.continue_ema_std=0.1, the default) → power-ema.json
  rejudge    the week's recorded nights judged again under the project's current rule (flows.gate.DEFAULT_RULE,
             by flows.registry.judge) along each version's recorded parent, from the recorded gate scores and
             paired σ_gap (unpaired where the pair differs from the recorded one); exact because training is
             deterministic, and refused unless each night continued the version that is champion under the
             rule (the version a night would continue under it). Each night's champion, scored at
             <num-samples> when missing → week-rejudged.json, which says whether each night was decided as the
             week recorded it (agrees_with_the_week: the check that a week run under the current rule matches it)
  plot       docs/nightly-week.png: the champion's and the night's new version's FID per night, beside the
             final scores of the week, the uninterrupted run and the arms (those whose JSON exists), the
             champion per night of week-rule-better.json (the same nights through the deployment when the gate
             judged a continuation 'better', as any other candidate) and of week-restart.json (an earlier week
             whose continuations restarted warm-up and cosine decay each night) when they are kept, and the
             re-judged champion where re-judging disagrees with the week
  lineage    docs/mlflow-lineage.png: the stack brought up again on the week's state (ports change, the
             registry and artifacts stay) and the champion version's page shot by infra/mlflow_screenshots.py
             (needs Chromium and the `screenshots` extra): its description states the lineage and the gate's
             decision (MLflow 3's version page lists only its first five tags)
Every JSON carries the fp32 matmul GFLOP/s measured in the same process before and after. Run it on an
otherwise idle machine: a second PyTorch job on the same cores does not halve the speed, it collapses it
(one training measured 10 images/s beside another against 230 alone on 2 cores: their OpenMP threads wait
for each other), which changes only the wall times, never the models (training is a function of the steps).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from load_test import group_alive, kill_below, stack, stack_env

from diffusion_core.config import load_config
from diffusion_core.runtime import matmul_gflops

REPO = Path(__file__).resolve().parent.parent
MODEL = "ddpm-mnist"


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Run `cmd` (output shown as it comes); raise with its tail if it fails; return its output."""
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}:\n{proc.stdout[-3000:]}")
    return proc.stdout


def score_key(model_dir: Path, num_samples: int) -> str:
    """What a `diffusion evaluate` score of `model_dir` is a function of, given the scoring code: the weights'
    bytes, the config sections that build, sample and bootstrap it, the data version it is scored against, and
    N. The code and the feature extractor are not in the key: after changing how models are scored, delete
    <work>/scores."""
    model_dir = model_dir / "model" if (model_dir / "model").is_dir() else model_dir  # a run folder holds it
    saved = json.loads((model_dir / "config.json").read_text())
    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes())
    settings = {section: saved["config"][section] for section in ("model", "diffusion", "sample", "evaluation")}
    digest.update(json.dumps({**settings, "dataset_sha256": saved["dataset_sha256"], "num_samples": num_samples},
                             sort_keys=True).encode())
    return digest.hexdigest()


def evaluate(model_dir: Path, num_samples: int, out: Path) -> dict:
    """`diffusion evaluate` → `out`, unless `out` exists (an interrupted benchmark keeps its scores) or a model
    with the same score_key was scored in this --work folder before (training is deterministic, so a week run
    again reproduces its models bit for bit): then that score is reused, and `out` says so (`score_reused`)."""
    if not out.is_file():
        cached = out.parent / "scores" / f"{score_key(model_dir, num_samples)}.json"
        if cached.is_file():
            print(f"{model_dir}: same weights and settings as {cached.name[:12]}…, "
                  f"its N = {num_samples:,} score reused")
            out.write_text(json.dumps({**json.loads(cached.read_text()), "score_reused": cached.stem}, indent=2) + "\n")
        else:
            run(["diffusion", "evaluate", "--model", str(model_dir), "-n", str(num_samples), "--out", str(out)])
            cached.parent.mkdir(exist_ok=True)
            shutil.copy(out, cached)
    return json.loads(out.read_text())


def fid_of(score: dict) -> tuple[float, float]:
    key = next(k for k in score if k.startswith("fid_") and not k.startswith("fid_std"))
    return score[key], score[key.replace("fid_", "fid_std_", 1)]


def write(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


def reference(args, work: Path, out: Path) -> None:
    peak = matmul_gflops()
    run_dir = work / "reference"
    started = time.perf_counter()
    run(["diffusion", "train", "--preset", "mnist-cpu", "--set", f"train.steps={args.reference_steps}",
         "--run-dir", str(run_dir)])
    train_s = time.perf_counter() - started
    score = evaluate(run_dir, args.num_samples, work / "reference-score.json")
    fid, std = fid_of(score)
    write(out / "reference.json", {"what": f"mnist-cpu, {args.reference_steps} steps in one run", "fid": fid,
                                   "fid_std": std, "score": score, "train_s": round(train_s, 1),
                                   "matmul_gflops_fp32": {"before": round(peak, 1), "after": round(matmul_gflops(), 1)}})


def week(args, work: Path, out: Path) -> None:
    peak = matmul_gflops()
    progress = work / "week-nights.json"
    done = json.loads(progress.read_text()) if progress.is_file() else {}
    if not (done.get("kept") and len(done["nights"]) == args.nights):  # else the nights ran; only scores are left
        done = run_nights(args, work)
    nights = done["nights"]
    # At <num-samples>: every night's champion (the gate promotes only on a gain beyond its margin, so a
    # champion can stay for nights) and the last night's new version, the training head.
    models = {night["champion"]: night["model_dir"] for night in nights}
    models.setdefault(nights[-1]["version"], nights[-1]["version_model_dir"])
    scores = {version: evaluate(work / model, args.num_samples, work / f"version-{version}-score.json")
              for version, model in models.items()}
    versions = {version: dict(zip(("fid", "fid_std"), fid_of(score))) for version, score in scores.items()}
    final = nights[-1]["champion"]
    recipe = load_config("mnist-cpu").train
    write(out / "week.json", {"what": f"{args.nights} nights of {args.night_steps} steps through train-eval/nightly "
                              f"(policy continue, continue_schedule {recipe.continue_schedule}, continue_ema_std "
                              f"{recipe.continue_ema_std}); fid: the champion after the last night (v{final}); "
                              f"versions: each night's champion and the last new version at N = {args.num_samples:,}",
                              "gate_rule": done.get("rule"), "gate_continuation": done.get("continuation"),
                              "nights": nights, "champion": final, **versions[final], "score": scores[final],
                              "versions": versions, "head": nights[-1]["version"],
                              "matmul_gflops_fp32": {"before": round(peak, 1), "after": round(matmul_gflops(), 1)}})


@contextlib.contextmanager
def local_stack(root: Path):
    """infra/stack.sh up on the state under `root` (kept between calls), yield the client's environment (its
    MLFLOW_TRACKING_URI also set in this process), then down, killing whatever the services left."""
    env = stack_env("sqlite", root, os.environ["DIFFUSION_DATA_SOURCE"])
    env.update({"DIFFUSION_RUNS_DIR": str(root / "runs"), "DIFFUSION_DATA_DIR": str(root / "data")})
    pids = root / "state" / "pids"
    try:
        up = stack(env, "up", timeout=900)
        if up.returncode != 0:
            raise RuntimeError(f"infra/stack.sh up failed:\n{up.stdout}\n{up.stderr}")
        exports = stack(env, "env", timeout=60).stdout.splitlines()
        client_env = {**env, **dict(line.removeprefix("export ").split("=", 1) for line in exports)}
        os.environ["MLFLOW_TRACKING_URI"] = client_env["MLFLOW_TRACKING_URI"]
        yield client_env
    finally:
        if (pids / "serve.pid").exists():
            kill_below(int((pids / "serve.pid").read_text()))
        leaders = [int(p.read_text()) for p in pids.glob("*.pid")] if pids.is_dir() else []
        stack(env, "down", timeout=300)
        for pid in leaders:
            if group_alive(pid):
                os.killpg(pid, signal.SIGKILL)


def run_nights(args, work: Path) -> dict:
    """The nights through the stack's nightly deployment, their models and training states kept in `work`:
    {"nights": […], "kept": True, "rule" and "continuation": the registered model's promotion rule after the last
    night}."""
    progress = work / "week-nights.json"
    root = work / "stack"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for stale in work.glob("version-*-score.json"):  # an earlier week's versions
        stale.unlink()
    nights = []
    with local_stack(root) as client_env:
        from mlflow import MlflowClient

        client = MlflowClient()
        for night in range(1, args.nights + 1):
            started = time.perf_counter()
            text = run([sys.executable, "-m", "prefect", "deployment", "run", "train-eval/nightly",
                        "--param", "preset=mnist-cpu", "--param", "policy=continue",
                        "--param", f"overrides={json.dumps({'train.steps': args.night_steps})}",
                        "--param", "num_samples=16", "--watch", "--watch-timeout", "14400"], client_env)
            wall_s = time.perf_counter() - started
            champion = str(client.get_registered_model(MODEL).aliases["champion"])
            newest = max(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
            tags = client.get_model_version(MODEL, champion).tags
            champion_dir = Path(client.get_run(client.get_model_version(MODEL, champion).run_id).data.tags["work_dir"])
            version_dir = Path(client.get_run(newest.run_id).data.tags["work_dir"])
            nights.append({"night": night, "wall_s": round(wall_s, 1), "state": text.strip().splitlines()[-1],
                           "version": str(newest.version), "version_fid": float(newest.tags["eval.fid"]),
                           "version_fid_std": float(newest.tags["eval.fid_std"]),
                           "decision": newest.tags["champion.decision"], "reason": newest.tags["champion.reason"],
                           "version_parent": newest.tags.get("lineage.parent", "none"),
                           "compared_version": newest.tags.get("champion.compared_version", "none"),
                           "gap_std": newest.tags.get("champion.gap_std", "none"),
                           "margin": newest.tags.get("champion.margin", "none"),
                           "champion": champion, "fid": float(tags["eval.fid"]), "fid_std": float(tags["eval.fid_std"]),
                           "num_samples": int(tags["eval.num_samples"]),
                           "lineage": {k: v for k, v in tags.items() if k.startswith("lineage.")},
                           "model_dir": str(champion_dir / "model"),
                           "state_file": str(champion_dir / "checkpoints" / "last.safetensors"),
                           "version_model_dir": str(version_dir / "model")})
            print(json.dumps(nights[-1], indent=2), flush=True)
            write(progress, {"nights": nights})  # progress, for a look while it runs
        for night in nights:  # a new week wipes the stack's folder; keep what later phases read, paths under `work`
            target = Path("week-models") / f"night-{night['night']}"
            shutil.copytree(Path(night["model_dir"]), work / target / "model", dirs_exist_ok=True)
            (work / target / "checkpoints").mkdir(parents=True, exist_ok=True)
            shutil.copy(night["state_file"], work / target / "checkpoints" / "last.safetensors")
            shutil.copytree(Path(night["version_model_dir"]), work / target / "version" / "model", dirs_exist_ok=True)
            night["model_dir"], night["state_file"] = str(target / "model"), str(target / "checkpoints" / "last.safetensors")
            night["version_model_dir"] = str(target / "version" / "model")
        from flows.gate import read_gate

        rule = read_gate(client, MODEL).rule
        done = {"nights": nights, "kept": True, "rule": str(rule), "continuation": rule.continuation}
        write(progress, done)
    return done


def rejudge(args, work: Path, out: Path) -> None:
    """The recorded nights of week.json judged by DEFAULT_RULE → week-rejudged.json (see the module doc)."""
    from flows.gate import DEFAULT_RULE
    from flows.registry import Score, judge

    recorded = json.loads((out / "week.json").read_text())["nights"]
    scores = {n["version"]: Score(n["version_fid"], {}, n["version_fid_std"]) for n in recorded}
    parents = {n["version"]: n["version_parent"] for n in recorded}
    named = {id(score): version for version, score in scores.items()}
    measured = {}  # (reference, candidate) → the paired σ_gap the week's gate measured
    for before, night in zip(recorded, recorded[1:]):
        compared = night.get("compared_version", "none")
        if night["gap_std"] != "none":
            measured[(before["champion"] if compared == "none" else compared, night["version"])] = float(night["gap_std"])
    champion, nights = None, []
    for night in recorded:
        version = night["version"]
        if parents[version] != (champion or "none"):
            raise SystemExit(f"night {night['night']} continued v{parents[version]}, but under {DEFAULT_RULE.continuation!r} "
                             f"the champion, which a night continues, would be v{champion}: the nights would differ, "
                             "so only running the week again measures this rule")
        line, node = [], parents[version]
        while node != "none":
            line.append((node, scores[node]))
            node = parents[node]
        decision = judge(scores[version], champion, scores.get(champion), DEFAULT_RULE,
                         lambda reference, _, v=version: measured.get((named[id(reference)], v)), line)
        champion = version if decision.promoted else champion
        decided = "promoted" if decision.promoted else "kept"
        nights.append({"night": night["night"], "version": version, "decision": decided, "reason": decision.reason,
                       "champion": champion, "as_run": (night["decision"], night["champion"]) == (decided, champion)})
    model_dirs = {n["version"]: n["version_model_dir"] for n in recorded}
    versions = {v: dict(zip(("fid", "fid_std"), fid_of(evaluate(work / model_dirs[v], args.num_samples,
                                                               work / f"version-{v}-score.json"))))
                for v in dict.fromkeys(n["champion"] for n in nights)}
    agrees = all(n["as_run"] for n in nights)
    print(f"re-judged under {DEFAULT_RULE.continuation!r}: " + ("every night decided as the week did" if agrees else
          "nights " + ", ".join(str(n["night"]) for n in nights if not n["as_run"]) + " decided otherwise"))
    write(out / "week-rejudged.json", {"what": f"week.json's nights judged again under: {DEFAULT_RULE}; as_run: the "
                                       "decision and champion the week itself recorded; versions: each night's "
                                       f"champion at N = {args.num_samples:,}", "agrees_with_the_week": agrees,
                                       "nights": nights,
                                       "champion": champion, **versions[champion], "versions": versions})


def lineage(args, work: Path) -> None:
    """docs/mlflow-lineage.png: the stack brought up again on the week's state, the champion version's page."""
    with local_stack(work / "stack") as client_env:
        run([sys.executable, str(REPO / "infra" / "mlflow_screenshots.py"), "--url", client_env["MLFLOW_TRACKING_URI"],
             "--model", MODEL, "--pages", "lineage"])


# The ways to continue, each run as the nights 2… of the week from night 1's training state (the week's
# nights use the preset's continuation recipe, which the power-ema arm chose; week-restart.json is the week
# under the "restart" schedule: warm-up and cosine decay every night).
ARMS = {
    "constant": {"train.continue_schedule": "constant", "train.continue_ema_std": 0},  # the fixed-decay EMA sampled
    "power-ema": {"train.continue_schedule": "constant", "train.continue_ema_std": 0.1},  # EDM2's power EMA
}


def arm(name: str, args, work: Path, out: Path) -> None:
    """Nights 2… by `diffusion train --continue-from` under ARMS[name], from night 1's state → <name>.json."""
    if not (out / "week.json").is_file():
        raise SystemExit(f"{name} continues night 1 of the week: run --phases week first ({out / 'week.json'} is missing)")
    peak = matmul_gflops()
    nights = json.loads((out / "week.json").read_text())["nights"]
    state = work / nights[0]["state_file"]
    sets = [f"{key}={value}" for key, value in {"train.steps": args.night_steps, **ARMS[name]}.items()]
    started = time.perf_counter()
    for night in range(2, args.nights + 1):
        run_dir = work / name / f"night-{night}"
        run(["diffusion", "train", "--preset", "mnist-cpu", *[a for s in sets for a in ("--set", s)],
             "--continue-from", str(state), "--run-dir", str(run_dir)])
        state = run_dir / "checkpoints" / "last.safetensors"
    train_s = time.perf_counter() - started
    score = evaluate(state.parent.parent, args.num_samples, work / f"{name}-score.json")
    fid, std = fid_of(score)
    write(out / f"{name}.json", {"what": f"night 1, then {args.nights - 1} continuations of {args.night_steps} steps "
                                 f"with {', '.join(sets[1:])}", "fid": fid, "fid_std": std, "score": score,
                                 "train_s": round(train_s, 1),
                                 "matmul_gflops_fp32": {"before": round(peak, 1), "after": round(matmul_gflops(), 1)}})


def plot(args, out: Path) -> Path:
    """Left, at <num-samples>: the champion after each night and the last night's new version, beside the
    uninterrupted run (and 1.1× it), the arms and the restart week's last champion. Right, the gate's view
    (N = the preset's evaluation.num_samples): the champion and the night's new version per night."""
    from diffusion_core.figures import new_figure, save_png

    week_doc = json.loads((out / "week.json").read_text())
    nights, versions = week_doc["nights"], week_doc["versions"]
    x = [n["night"] for n in nights]
    fig, (final, gate) = new_figure(2, width_in=11.0, height_in=4.2)
    n_final, n_gate = f"N = {args.num_samples:,}", f"N = {nights[0]['num_samples']:,}"
    judged = week_doc.get("gate_continuation")  # recorded since the rule has that setting
    final.errorbar(x, [versions[n["champion"]]["fid"] for n in nights],
                   yerr=[versions[n["champion"]]["fid_std"] for n in nights], marker="o", capsize=3, color="C0",
                   label=f"champion after each night, as run{f' (continuations judged {judged!r})' if judged else ''}")
    head = versions[week_doc["head"]]
    final.errorbar([x[-1] + 0.05], [head["fid"]], yerr=[head["fid_std"]], marker="s", capsize=3, color="C4",
                   linestyle="none", label=f"night {x[-1]}'s new version v{week_doc['head']} (training head)")
    lines = {"reference": ("C1", "--", "one uninterrupted run, same hour"),
             "power-ema": ("C3", ":", "nights 2… by the CLI, same recipe"),
             "constant": ("C2", ":", "nights 2… constant rate, fixed EMA"),
             "week-restart": ("0.5", ":", "last champion, warm-restart week")}
    for name, (color, style, what) in lines.items():  # each JSON's "what" says it in full
        path = out / f"{name}.json"
        if path.is_file():
            doc = json.loads(path.read_text())
            final.axhline(doc["fid"], color=color, linestyle=style, label=f"{what}: {doc['fid']:.2f} ± {doc['fid_std']:.2f}")
            if name == "reference":
                final.axhline(1.1 * doc["fid"], color=color, linestyle="-", alpha=0.4, label="1.1× the uninterrupted run")
    stricter = out / "week-rule-better.json"
    if stricter.is_file():
        before = json.loads(stricter.read_text())
        final.plot([n["night"] + 0.1 for n in before["nights"]], [before["versions"][n["champion"]]["fid"]
                                                                 for n in before["nights"]],
                   marker="x", color="0.4", linestyle="--", label="champion, same nights judged 'better'")
        versions = {**versions, **before["versions"]}
    rejudged = out / "week-rejudged.json"
    again = json.loads(rejudged.read_text()) if rejudged.is_file() else None
    if again and not again.get("agrees_with_the_week"):  # else the week's own line shows it
        from flows.gate import DEFAULT_RULE

        final.errorbar([n["night"] - 0.05 for n in again["nights"]],
                       [again["versions"][n["champion"]]["fid"] for n in again["nights"]],
                       yerr=[again["versions"][n["champion"]]["fid_std"] for n in again["nights"]], marker="^",
                       capsize=3, color="C5", label=f"champion, the same nights re-judged ('{DEFAULT_RULE.continuation}')")
        versions = {**versions, **again["versions"]}
    final.set(xlabel="night", ylabel="LeNet FID", title=f"at {n_final}", xticks=x)
    gate.errorbar(x, [n["fid"] for n in nights], yerr=[n["fid_std"] for n in nights], marker="o", capsize=3,
                  color="C0", label="champion after each night")
    gate.errorbar([v + 0.05 for v in x], [n["version_fid"] for n in nights],
                  yerr=[n.get("version_fid_std", 0.0) for n in nights], marker="s", capsize=3, color="C4",
                  label="the night's new version")
    earlier = out / "week-restart.json"
    if earlier.is_file():
        before = json.loads(earlier.read_text())["nights"]
        gate.plot([n["night"] - 0.05 for n in before], [n["fid"] for n in before], marker="x", color="0.5",
                  linestyle=":", label="champion, warm-restart week")
    gate.set(xlabel="night", ylabel="LeNet FID", title=f"the gate's view, {n_gate}", xticks=x)
    final.set_ylim(top=1.5 * max(v["fid"] + v["fid_std"] for v in versions.values()))  # room for the legend
    final.legend(fontsize=7, loc="upper right")
    gate.legend(fontsize=7)
    for ax in (final, gate):
        ax.grid(alpha=0.3)
    fig.suptitle("nightly continuation against one uninterrupted run")
    return save_png(fig, REPO / "docs" / "nightly-week.png", rect=(0, 0, 1, 0.95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=4)
    parser.add_argument("--night-steps", type=int, default=4500, help="train.steps of a night (mnist-cpu: 4500)")
    parser.add_argument("--reference-steps", type=int, default=18000, help="the uninterrupted run (mnist-cpu-hour: 18000)")
    parser.add_argument("--num-samples", type=int, default=10000, help="images behind each final score")
    parser.add_argument("--work", default="/tmp/nightly-week", help="run folders and the stack's state")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "nightly"))
    parser.add_argument("--phases", default="week,rejudge,reference,constant,power-ema,plot,lineage")
    args = parser.parse_args()
    if not os.environ.get("DIFFUSION_DATA_SOURCE"):
        parser.error("set DIFFUSION_DATA_SOURCE to a folder holding the MNIST raw files")
    phases = args.phases.split(",")
    unknown = [p for p in phases if p not in ("week", "rejudge", "reference", *ARMS, "plot", "lineage")]
    if unknown:
        parser.error(f"unknown phases {', '.join(unknown)}: choose from week, rejudge, reference, {', '.join(ARMS)}, "
                     "plot, lineage")
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    print(f"fp32 matmul {matmul_gflops():.0f} GFLOP/s; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    for phase in phases:
        if phase == "plot":
            print(f"wrote {plot(args, out)}")
        elif phase == "lineage":
            lineage(args, work)
        elif phase == "rejudge":
            rejudge(args, work, out)
        elif (out / f"{phase}.json").is_file():
            print(f"{phase}: {out / f'{phase}.json'} exists, skipped")
        elif phase in ARMS:
            arm(phase, args, work, out)
        else:
            {"reference": reference, "week": week}[phase](args, work, out)


if __name__ == "__main__":
    main()
