"""`diffusion` command line: prepare, upload-dataset, train, distill, sample, evaluate.

Settings come from a preset file (`--preset`, see diffusion_core/presets/) plus `--set section.field=value`
overrides; `diffusion train --preset mnist-cpu --set train.steps=500` for instance.

Errors in what was asked for (settings, data, checkpoints, a diverged run) end the command with a
one-line message naming the problem (exit 2 for a setting, 1 otherwise); anything else is a bug and
keeps its full traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import DEFAULT_PRESET, ConfigError, load_config
from .data import DATASETS, DataError
from .guidance import balanced_labels, parse_classes
from .samplers import SAMPLERS, SPACINGS
from .train import TrainingDiverged


def _add_config_args(parser: argparse.ArgumentParser, default_preset: str = DEFAULT_PRESET) -> None:
    parser.add_argument("--preset", default=default_preset, help="preset name (diffusion_core/presets/) or a .toml path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one setting (repeatable), e.g. --set train.steps=100")


def _log_snr_levels(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of log SNR values such as "
                                         "-4.5,-1.5,0.5") from None


def _add_levels_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--levels-log-snr", type=_log_snr_levels, metavar="L2,L3,…",
                        help="consistency sampler: log SNR of the levels after T−1, one per step after the first, "
                             "written --levels-log-snr=-4.5,-1.5,0.5 (default: the model's config at its steps)")


def _add_sde_noise_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sde-noise", type=float, metavar="η",
                        help="dpm++2m-sde: noise of the reverse SDE, > 0; 1 is Lu et al.'s, larger re-noises more each "
                             "step (default: the model's sample.sde_noise)")


def cmd_prepare(args: argparse.Namespace) -> None:
    from .data import prepare_dataset

    config = load_config(args.preset, args.overrides)
    prepared = prepare_dataset(config.data.dataset, config.data.source, config.data.data_dir)
    print(f"{prepared.spec.name}: {prepared.path} sha256={prepared.sha256}")


def cmd_upload_dataset(args: argparse.Namespace) -> None:
    from .data import upload_dataset

    for uri in upload_dataset(args.dataset, args.source, args.to):
        print(f"uploaded {uri}")
    print(f"{args.dataset}: every file verified before the upload and again read back from {args.to}; "
          f"use data.source={args.to} (or DIFFUSION_DATA_SOURCE)")


def cmd_train(args: argparse.Namespace) -> None:
    from .tracking import mlflow_metrics_from_environ
    from .train import train

    config = load_config(args.preset, args.overrides)
    run_dir = Path(args.run_dir or f"runs/{config.name}")
    if args.nproc_per_node is not None:  # re-run this command under torchrun, one process per rank
        from .launch import launch_training

        sys.exit(launch_training(config, run_dir, args.nproc_per_node, resume=not args.no_resume,
                                 continue_from=args.continue_from, allow_new_data=args.allow_new_data))
    with mlflow_metrics_from_environ(run_dir) as on_metrics:  # an orchestrator's MLflow run (MLFLOW_RUN_ID), if any
        result = train(config, run_dir, resume=not args.no_resume, on_metrics=on_metrics,
                       continue_from=args.continue_from, allow_new_data=args.allow_new_data)
    print(f"trained to step {result.step}: loss {result.final_loss:.4f}, {result.images_per_s:.0f} images/s; "
          f"model in {run_dir / 'model'}")


def cmd_distill(args: argparse.Namespace) -> None:
    from .distill import distill

    run_dir = Path(args.run_dir or f"runs/{Path(args.teacher).name}-distilled")
    result = distill(args.teacher, run_dir, args.overrides, device=args.device)
    print(f"distilled for {result.steps} steps: loss {result.final_loss:.5f}, {result.images_per_s:.0f} images/s; "
          f"student in {run_dir / 'model'}")


def cmd_sample(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    from .atomic import atomic_path
    from .checkpoint import load_model
    from .distributed import DistContext, resolve_device
    from .images import grid_by_class, save_grid
    from .samplers import generate_batches

    device = resolve_device(args.device, DistContext())
    loaded = load_model(args.model, device)
    schedule = loaded.denoiser.schedule
    settings = loaded.config.sample.override(
        sampler=args.sampler, steps=args.steps, eta=args.eta, sde_noise=args.sde_noise, spacing=args.spacing,
        levels_log_snr=args.levels_log_snr, num_samples=args.num,
        batch_size=args.batch_size, seed=args.seed, guidance=args.guidance).resolved(schedule.timesteps)
    if settings.steps > schedule.timesteps:
        raise ConfigError(f"--steps {settings.steps} exceeds the model's {schedule.timesteps} timesteps")
    class_labels = _class_request(args, loaded.config, settings.num_samples)
    if class_labels is None:
        settings = settings.override(guidance=0.0)
    loaded.config.check_sample(settings)
    spec_shape = (loaded.config.model.in_channels,) + (_image_size(loaded.config),) * 2
    images = torch.cat(list(generate_batches(loaded.denoiser, schedule, spec_shape, settings, device=device,
                                             class_labels=class_labels)))
    if args.out:
        shown, per_row = grid_by_class(images, class_labels, args.grid_max)
        save_grid(shown, args.out, nrow=per_row)
        print(f"grid of {len(shown)} images: {args.out}")
    if args.tensor_out:
        tensors = {"images": images} if class_labels is None else {"images": images, "labels": class_labels}
        with atomic_path(args.tensor_out) as tmp:
            save_file(tensors, str(tmp), metadata={"sampler": settings.sampler, "steps": str(settings.steps),
                                                  "eta": str(settings.eta), "sde_noise": str(settings.sde_noise),
                                                  "spacing": settings.spacing,
                                                  "levels_log_snr": ",".join(map(str, settings.levels_log_snr)),
                                                  "seed": str(settings.seed), "guidance": str(settings.guidance)})
        print(f"{len(images)} uint8 images: {args.tensor_out}")


def _class_request(args: argparse.Namespace, config, num_samples: int) -> torch.Tensor | None:
    """Per-sample class labels (None: unconditional). A conditional model draws every class equally often
    unless told otherwise (pictures; scores use the reference split's class mix, see
    evaluation.protocol.scoring_labels); `--class none` asks it for its unconditional mode ε̂(x, ∅)
    instead. `--class 1,3` gives N/2 ones, then N/2 threes."""
    if not config.conditional:
        if args.classes is not None:
            raise ConfigError("this model is unconditional (trained without classes), so --class cannot be used; "
                              "train one with model.num_classes set (e.g. --preset mnist-cpu-cond)")
        if args.guidance:
            raise ConfigError("--guidance needs a class-conditional model (trained with model.num_classes set)")
        return None
    if args.classes is None:
        return balanced_labels(num_samples, config.model.num_classes)
    if args.classes.strip().lower() == "none":
        if args.guidance:
            raise ConfigError("--guidance needs classes to draw: --class 7, 1,3,5 or all, not none")
        return None
    try:
        classes = parse_classes(args.classes, config.model.num_classes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if num_samples % len(classes):
        raise ConfigError(f"-n {num_samples} must be a multiple of the {len(classes)} classes asked for")
    return torch.tensor(classes).repeat_interleave(num_samples // len(classes))


def _image_size(config) -> int:
    from .data import get_spec

    return get_spec(config.data.dataset).image_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="fetch, verify and convert a dataset once")
    _add_config_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("upload-dataset", help="put a dataset's verified raw files into an s3:// data source")
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--from", dest="source", required=True, metavar="DIR",
                   help="local folder holding the original raw files (directly, or in raw/ or <Dataset>/raw/)")
    p.add_argument("--to", required=True, metavar="s3://BUCKET/PREFIX",
                   help="where data.source will read them (endpoint and AWS_* credentials from the environment)")
    p.set_defaults(func=cmd_upload_dataset)

    p = sub.add_parser("train", help="train a model (resumes from the run folder's checkpoint)")
    _add_config_args(p)
    p.add_argument("--run-dir", help="run folder (default runs/<preset>)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in the run folder")
    p.add_argument("--nproc-per-node", default=None, help="processes under torchrun (an integer or 'auto')")
    p.add_argument("--continue-from", metavar="CHECKPOINT",
                   help="a trained run's checkpoints/last.safetensors: start from its full state and train "
                        "train.steps more under train.continue_schedule (when the run folder has nothing to resume)")
    p.add_argument("--allow-new-data", action="store_true",
                   help="with --continue-from: continue on a dataset version other than the one it was trained on")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="distil a trained model into a few-step student (consistency or progressive)")
    p.add_argument("--teacher", required=True, help="the trained model: exported model folder or run folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one of the teacher's settings (repeatable), e.g. --set distill.steps=2000")
    p.add_argument("--run-dir", help="run folder (default runs/<teacher folder>-distilled)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("sample", help="sample images from a trained model")
    p.add_argument("--model", required=True, help="exported model folder, run folder or training checkpoint")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the model's config")
    p.add_argument("--steps", type=int, help="network evaluations (default: the model's config for its sampler; "
                                             "else all T for ddpm, 50 for the others)")
    p.add_argument("--spacing", choices=SPACINGS, help="timestep spacing (default: the model's config for its sampler; "
                                                       "else log_snr for dpm++2m(-sde), linear for ddpm and ddim)")
    _add_levels_arg(p)
    p.add_argument("--eta", type=float, help="DDIM η in [0, 1]")
    _add_sde_noise_arg(p)
    p.add_argument("--class", dest="classes", metavar="C",
                   help="conditional models: class to draw (7), several (1,3,5: one grid row each), 'all' "
                        "(the default: every class equally often) or 'none' (the unconditional mode)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance weight w >= 0 (default: the model's config)")
    p.add_argument("-n", "--num", type=int, help="number of images")
    p.add_argument("--batch-size", type=int, help="images per network call")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="PNG grid path")
    p.add_argument("--grid-max", type=int, default=256, help="most images put in the grid")
    p.add_argument("--tensor-out", help="safetensors file for all images as uint8 [N, C, H, W]")
    p.set_defaults(func=cmd_sample)

    try:
        from .evaluation.cli import add_evaluate_parser
    except ImportError as exc:
        if (exc.name or "").startswith("diffusion_core"):
            raise  # our own import is broken: a bug, not a missing dependency
        _add_unavailable(sub, ("evaluate", "evaluate-extractor"), exc)
    else:
        add_evaluate_parser(sub)
    return parser


def _add_unavailable(sub, commands: tuple[str, ...], exc: ImportError) -> None:
    """Commands whose dependency failed to import stay listed, and say what is missing when run."""
    def unavailable(args: argparse.Namespace) -> None:
        raise DataError(f"diffusion {args.command} needs the module {exc.name!r}, which cannot be imported ({exc}); "
                        "reinstall the project's dependencies: pip install -e . (torch-fidelity==0.4.0)")

    for command in commands:
        # no option prefix, so every argument (--model …) is taken as it comes and the message is what is shown
        p = sub.add_parser(command, help=f"unavailable: {exc.name} cannot be imported", add_help=False,
                           prefix_chars="\0")
        p.add_argument("rest", nargs="*")
        p.set_defaults(func=unavailable)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (DataError, CheckpointError, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
