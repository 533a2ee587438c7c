"""`diffusion evaluate` and `diffusion evaluate-extractor` (see the package docstring for examples)."""

from __future__ import annotations

import argparse
import dataclasses
import os

from ..cli import _add_config_args, _add_levels_arg, _add_sde_noise_arg
from ..config import DEFAULT_PRESET, ENV_OVERRIDES, SAMPLERS, Config, ConfigError, DataConfig, SampleConfig, load_config
from ..data import SPLITS
from ..samplers import SPACINGS
from .extractors import EXTRACTORS
from .protocol import REFERENCE_SPLIT, primary_settings


def _data_config(base: DataConfig, args: argparse.Namespace) -> DataConfig:
    """base ← DIFFUSION_DATA_SOURCE / DIFFUSION_DATA_DIR ← --data-source / --data-dir."""
    values = {}
    for var, dotted in ENV_OVERRIDES.items():
        if os.environ.get(var):
            values[dotted.split(".", 1)[1]] = os.environ[var]
    if args.data_source:
        values["source"] = args.data_source
    if args.data_dir:
        values["data_dir"] = args.data_dir
    return dataclasses.replace(base, **values)


def _settings(config: Config, args: argparse.Namespace) -> SampleConfig:
    """The champion's setting of the model's (or preset's) config, protocol.primary_settings, with the
    flags given on top; a sampler other than the config's takes its own default steps and spacing unless
    they are given too."""
    settings = primary_settings(config).override(
        sampler=args.sampler, steps=args.steps, eta=args.eta, sde_noise=args.sde_noise, spacing=args.spacing,
        levels_log_snr=args.levels_log_snr, num_samples=args.num_samples,
        seed=args.seed, batch_size=args.batch_size, guidance=args.guidance)
    return settings.resolved(config.diffusion.timesteps)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from ..checkpoint import load_model
    from ..distributed import DistContext, resolve_device
    from .evaluator import compute_floors, evaluate, format_table, save_metrics

    if not args.model and not args.floors:
        raise ConfigError("give --model PATH to evaluate a model, and/or --floors for the real-data and noise floors")
    device = resolve_device(args.device, DistContext())
    loaded = load_model(args.model, device) if args.model else None
    config = load_config(args.preset) if loaded is None else loaded.config
    s = _settings(config, args)
    if loaded is not None:
        config.check_sample(s)
    data = _data_config(config.data, args)
    common = dict(extractor=args.extractor, split=args.split, seed=s.seed, batch_size=s.batch_size, device=device,
                  inception_weights=args.inception_weights)
    metrics = {}
    if loaded is not None:
        metrics.update(evaluate(loaded, data=data, sampler=s.sampler, steps=s.steps, eta=s.eta,
                                sde_noise=s.sde_noise, spacing=s.spacing,
                                levels_log_snr=s.levels_log_snr,
                                clip_x0=s.clip_x0, num_samples=s.num_samples,
                                guidance=s.guidance if config.conditional else args.guidance,
                                bootstrap=config.evaluation.bootstrap if args.bootstrap is None else args.bootstrap,
                                **common))
    if args.floors:
        metrics.update(compute_floors(data, num_samples=s.num_samples, **common))
    print(f"{metrics['extractor_id']} on {metrics['num_samples']} images vs the {args.split} split "
          f"of {metrics['dataset']} ({metrics['dataset_sha256'][:12]})")
    print(format_table(metrics))
    if args.out:
        save_metrics(args.out, metrics)
        print(f"metrics: {args.out}")


def cmd_evaluate_extractor(args: argparse.Namespace) -> None:
    from ..data import prepare_dataset
    from .classifier_store import ensure_classifier, export_classifier

    config = load_config(args.preset, args.overrides)
    prepared = prepare_dataset(config.data.dataset, config.data.source, config.data.data_dir)
    record = ensure_classifier(prepared, config.data.data_dir, epochs=args.epochs, seed=args.seed)
    meta = record.meta
    print(f"{record.extractor_id}: test accuracy {meta['test_accuracy']:.4f}, seed {meta['seed']}, "
          f"{meta['epochs']} epochs, {meta['train_seconds']} s; {record.weights_path}")
    if args.copy_to:
        print(f"copied to {export_classifier(record, args.copy_to)}")


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="FID/KID/precision/recall of a model's samples against real data; "
                                               "without sampling flags, the setting of the pipeline's champion score")
    p.add_argument("--model", help="exported model folder, run folder or training checkpoint")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the model's sample.sampler")
    p.add_argument("--steps", type=int, help="network evaluations (default: the model's config for its sampler; "
                                             "else all T for ddpm, 50 for the others)")
    p.add_argument("--eta", type=float, help="DDIM η in [0, 1] (default: the model's sample.eta)")
    _add_sde_noise_arg(p)
    p.add_argument("--spacing", choices=SPACINGS, help="timestep spacing (default: the model's config for its sampler; "
                                                       "else log_snr for dpm++2m(-sde), linear for ddpm and ddim)")
    _add_levels_arg(p)
    p.add_argument("--guidance", type=float, help="class-conditional models: guidance weight w (default: the "
                                                  "model's sample.guidance); labels follow the --split's class mix")
    p.add_argument("-n", "--num-samples", type=int, help="images to generate, and floor set size "
                                                         "(default: the model's or preset's evaluation.num_samples)")
    p.add_argument("--extractor", choices=EXTRACTORS, default="lenet",
                   help="lenet: the project's classifier for 28×28 datasets; inception: torch-fidelity's Inception-v3")
    p.add_argument("--inception-weights", help="local weights-inception-2015-12-05-6726825d.pth "
                                               "(default: $DIFFUSION_INCEPTION_WEIGHTS, then the torch hub cache)")
    p.add_argument("--bootstrap", type=int, help="resamples for FID's standard error fid_std (0: none; with "
                                                 "inception each costs seconds; default: the model's evaluation.bootstrap)")
    p.add_argument("--split", choices=SPLITS, default=REFERENCE_SPLIT, help="real split to compare with")
    p.add_argument("--floors", action="store_true", help="also score N real train images and N noise images")
    p.add_argument("--seed", type=int, help="sampling seed (default: the model's sample.seed)")
    p.add_argument("--batch-size", type=int, help="images per network call (default: the model's sample.batch_size)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-source", help="overrides the model's data.source (and $DIFFUSION_DATA_SOURCE)")
    p.add_argument("--data-dir", help="overrides the model's data.data_dir (and $DIFFUSION_DATA_DIR)")
    p.add_argument("--preset", default=DEFAULT_PRESET, help="data and evaluation settings when no --model "
                                                        "is given (floors only)")
    p.add_argument("--out", help="JSON file for the metrics")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("evaluate-extractor", help="train (once per dataset version) and check the lenet "
                                                         "classifier used as feature extractor")
    _add_config_args(p)
    p.add_argument("--epochs", type=int, default=3, help="training epochs (when no weights exist yet)")
    p.add_argument("--seed", type=int, default=0, help="training seed (when no weights exist yet)")
    p.add_argument("--copy-to", help="also copy weights + metadata here (diffusion_core/evaluation/pretrained "
                                     "to ship them)")
    p.set_defaults(func=cmd_evaluate_extractor)
