"""sample-model: N images from a registered version, in shards, into an MLflow run; resumable and spreadable.

    python -m flows.sample_model --model ddpm-mnist-cond --num-samples 10000
    python -m flows.sample_model --model ddpm-mnist --version 3 --num-samples 2000 --sampler ddpm --seed 7
    python -m flows.sample_model --model ddpm-mnist-cond --num-samples 50000 --dask tcp://scheduler:8786

The version (by number, or the one `alias` points at, default `champion`) is sampled with its own
config's sample settings, each of sampler, steps, eta, guidance and seed replaceable; a class-conditional
model draws `classes` in turn (default: every class, as the pipeline does). Shard k holds images
k·shard_size … (k+1)·shard_size − 1, drawn as one batch by `generate_batches` seeded by (seed, k): a
shard's images depend on the seed, the shard size and its index only, never on which shards ran before,
in which process or on how many workers. So the same seed and shard size give the same images as one
process sampling `generate_batches(..., batch_size=shard_size)` in one go (`diffusion sample` with
`--batch-size` set to the shard size), bit for bit on the same hardware and software.

Each shard is a Prefect task that writes `shards/shard-<k>.safetensors` (uint8 images [n, C, H, W] and,
conditional, their `labels`), `shards/shard-<k>.png` (a contact sheet of up to CONTACT_SHEET_MAX of
them) and, only after both are in the store, the marker `shards/shard-<k>.done` (JSON: images, bytes,
sha256, where it ran): a shard without its marker is incomplete and sampled again. The MLflow run
(`sample-<model>-v<version>-<key>`) is found again by the tag `sample.key`, a hash of the version and
every setting, so running the same request again (after a kill, a failure, a lost worker) continues
it and samples only the shards without a marker. The flow runs one shard at a time in its own process
(each uses every core); with a Dask task runner (`--dask ADDRESS`, or $DIFFUSION_DASK_ADDRESS for the
deployment) the shards spread over the cluster's workers (infra/README.md). Every parameter is checked
(flows.parameters) before any work.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from mlflow import MlflowClient
from prefect import Flow, flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from safetensors.torch import save_file

from diffusion_core.checkpoint import LoadedModel
from diffusion_core.config import ConfigError, SampleConfig
from diffusion_core.data import get_spec
from diffusion_core.distributed import DistContext, resolve_device
from diffusion_core.guidance import balanced_labels
from diffusion_core.images import grid_by_class, save_grid
from diffusion_core.samplers import generate_batches

from .parameters import NAME, check_sampling_parameters
from .registry import CHAMPION, load_registered_model, resolve_version, version_parser
from .sample import SamplerSetting
from .tracking import ended_when_done, ensure_experiment, log_params, upload_artifacts

SHARDS_ARTIFACT = "shards"
KEY_TAG = "sample.key"
CONTACT_SHEET_MAX = 256  # images on a shard's PNG
DASK_ADDRESS_ENV = "DIFFUSION_DASK_ADDRESS"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def complete_shards(client: MlflowClient, run_id: str) -> set[int]:
    """Indices of the run's shards whose marker is in the store (with their tensors and contact sheet)."""
    names = {Path(item.path).name for item in client.list_artifacts(run_id, SHARDS_ARTIFACT)}
    return {int(name[len("shard-"):-len(".done")]) for name in names if name.startswith("shard-")
            and name.endswith(".done") and {f"{name[:-5]}.safetensors", f"{name[:-5]}.png"} <= names}


@functools.lru_cache(maxsize=2)
def _model(uri: str) -> LoadedModel:
    """The model at `uri`, loaded once per process (a worker samples many shards of it)."""
    return load_registered_model(uri, resolve_device("auto", DistContext()))


@task(name="sample-shard", task_run_name="shard-{index}", cache_policy=NO_CACHE)
def sample_shard(run_id: str, model_uri: str, settings: SampleConfig, index: int,
                 labels: list[int] | None) -> float:
    """Draw shard `index` (settings.num_samples images, batch `index` of the run's seed), upload its tensors
    and contact sheet, then its marker; return the seconds spent sampling."""
    loaded = _model(model_uri)
    spec = get_spec(loaded.config.data.dataset)
    shape = (spec.channels, spec.image_size, spec.image_size)
    class_labels = None if labels is None else torch.tensor(labels)
    start = time.perf_counter()
    (images,) = generate_batches(loaded.denoiser, loaded.denoiser.schedule, shape, settings,
                                 device=next(loaded.denoiser.parameters()).device, progress=False,
                                 class_labels=class_labels, first_batch=index)
    seconds = time.perf_counter() - start
    client, name = MlflowClient(), shard_name(index)
    with tempfile.TemporaryDirectory() as tmp:
        tensors = {"images": images} if class_labels is None else {"images": images, "labels": class_labels}
        weights = Path(tmp) / f"{name}.safetensors"
        save_file(tensors, str(weights), metadata={
            "model": model_uri, "protocol": SamplerSetting(settings, labels is not None).protocol,
            "seed": str(settings.seed), "shard": str(index), "shard_size": str(settings.batch_size),
            "first_image": str(index * settings.batch_size)})
        sheet, per_row = grid_by_class(images, class_labels, CONTACT_SHEET_MAX)
        save_grid(sheet, Path(tmp) / f"{name}.png", nrow=per_row)
        for path in (weights, Path(tmp) / f"{name}.png"):
            upload_artifacts(client, run_id, path, SHARDS_ARTIFACT)
        data = weights.read_bytes()
        marker = Path(tmp) / f"{name}.done"
        marker.write_text(json.dumps({
            "shard": index, "images": len(images), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "worker": f"{socket.gethostname()}:{os.getpid()}", "sampling_s": round(seconds, 3)}))
        upload_artifacts(client, run_id, marker, SHARDS_ARTIFACT)  # last: the shard now counts as complete
    return seconds


def _check_request(model: str, version: str | None, alias: str, num_samples: int, shard_size: int,
                   given: dict, classes: list[int] | None) -> None:
    """Refuse, before any work, what does not depend on the version (bounds, names, sampler values)."""
    check_sampling_parameters(num_samples, shard_size, given)
    for key, value, pattern in (("model", model, NAME), ("alias", alias, NAME)):
        if not (isinstance(value, str) and pattern.fullmatch(value)):
            raise ConfigError(f"parameter {key} refused: must match {pattern.pattern}, got {value!r}")
    if version is not None and not (isinstance(version, str | int) and str(version).isdigit()):
        raise ConfigError(f"parameter version refused: a version number such as 3, got {version!r}")
    if classes is not None and not (isinstance(classes, list) and classes and all(
            isinstance(c, int) and not isinstance(c, bool) for c in classes)):
        raise ConfigError(f"parameter classes refused: a list of class numbers such as [7] or [1, 3], got {classes!r}")
    SampleConfig(**given)  # names an unknown sampler, an eta outside [0, 1], a negative guidance


def _request(loaded: LoadedModel, given: dict, num_samples: int, shard_size: int,
             classes: list[int] | None) -> tuple[SampleConfig, list[int] | None]:
    """The version's sample settings with the requested changes, and the classes drawn in turn (None:
    unconditional; default: every class); refuses what the version cannot do."""
    config = loaded.config
    timesteps = loaded.denoiser.schedule.timesteps
    settings = config.sample.override(**given, num_samples=num_samples, batch_size=shard_size).resolved(timesteps)
    if settings.steps > timesteps:
        raise ConfigError(f"parameter steps refused: {settings.steps} exceeds the model's {timesteps} timesteps")
    config.check_sample(settings)
    if not config.conditional:
        if classes is not None or given.get("guidance"):
            raise ConfigError("parameters classes and guidance refused: this version is unconditional "
                              "(trained without model.num_classes)")
        return replace(settings, guidance=0.0), None
    k = config.model.num_classes
    if classes is not None and not all(0 <= c < k for c in classes):
        raise ConfigError(f"parameter classes refused: this version knows classes 0 to {k - 1}, got {classes}")
    return settings, classes if classes is not None else list(range(k))


def request_key(uri: str, settings: SampleConfig, classes: list[int] | None) -> str:
    """A hash of everything the images depend on: the version, the settings (with N and the shard size)
    and the classes. Equal requests find the same run."""
    document = {"model": uri, "settings": asdict(settings), "classes": classes}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def _find_or_create_run(client: MlflowClient, experiment_id: str, key: str, name: str, params: dict) -> str:
    found = client.search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run_id = client.create_run(experiment_id, run_name=name, tags={KEY_TAG: key}).info.run_id
    log_params(client, run_id, params)
    return run_id


@flow(name="sample-model", task_runner=ThreadPoolTaskRunner(max_workers=1))
def sample_model(model: str, version: str | None = None, alias: str = CHAMPION, num_samples: int = 1000,
                 shard_size: int = 250, sampler: str | None = None, steps: int | None = None,
                 eta: float | None = None, guidance: float | None = None, seed: int | None = None,
                 classes: list[int] | None = None) -> str:
    """Sample `num_samples` images of `model` `version` (default: the one `alias` points at) in shards of
    `shard_size` into an MLflow run, continuing the run of an equal earlier request; return its run id."""
    given = {key: value for key, value in dict(sampler=sampler, steps=steps, eta=eta, guidance=guidance,
                                               seed=seed).items() if value is not None}
    _check_request(model, version, alias, num_samples, shard_size, given, classes)
    client, logger = MlflowClient(), get_run_logger()
    version = resolve_version(client, model, version, alias)
    uri = f"models:/{model}/{version}"
    loaded = _model(uri)
    settings, drawn = _request(loaded, given, num_samples, shard_size, classes)
    labels = None if drawn is None else torch.tensor(drawn)[balanced_labels(num_samples, len(drawn))]
    key = request_key(uri, settings, drawn)
    setting = SamplerSetting(settings, drawn is not None)
    params = {"model": model, "version": version, "protocol": setting.protocol, "num_samples": num_samples,
              "shard_size": shard_size, "seed": settings.seed, "classes": ",".join(map(str, drawn or ["none"]))}
    run_id = _find_or_create_run(client, ensure_experiment(client, loaded.config.data.dataset), key,
                                 f"sample-{model}-v{version}-{key[:8]}", params)
    shards = -(-num_samples // shard_size)
    done = complete_shards(client, run_id)
    todo = [k for k in range(shards) if k not in done]
    logger.info("%s v%s, %s: %d images in %d shards of %d into MLflow run %s; %d complete, %d to sample",
                model, version, setting.protocol, num_samples, shards, shard_size, run_id, len(done), len(todo))
    progress = create_progress_artifact(100 * len(done) / shards, description=f"shards of MLflow run {run_id}")
    with ended_when_done(client, run_id):
        futures = {}
        for k in todo:
            first, n = k * shard_size, min(shard_size, num_samples - k * shard_size)
            futures[sample_shard.submit(run_id, uri, replace(settings, num_samples=n), k,
                                        None if labels is None else labels[first:first + n].tolist())] = (k, n)
        for finished, future in enumerate(as_completed(list(futures)), len(done) + 1):
            seconds = future.result()
            update_progress_artifact(progress, 100 * finished / shards)
            logger.info("shard %d: %d images in %.1f s; %d of %d shards complete", *futures[future], seconds,
                        finished, shards)
        missing = sorted(set(range(shards)) - complete_shards(client, run_id))
        if missing:
            raise RuntimeError(f"shards {missing} of run {run_id} are not complete in the store; run again to "
                               "sample them")
    return run_id


def sample_model_flow(dask_address: str | None = None) -> Flow:
    """`sample_model`, its shards on the Dask cluster at `dask_address` (tcp://host:8786) when given."""
    if not dask_address:
        return sample_model
    from prefect_dask import DaskTaskRunner

    return sample_model.with_options(task_runner=DaskTaskRunner(address=dask_address))


def main(argv: list[str] | None = None) -> None:
    parser = version_parser("python -m flows.sample_model", __doc__, "sample")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=250, help="images per shard (and per network call)")
    parser.add_argument("--sampler")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--eta", type=float)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--classes", type=lambda text: [int(c) for c in text.split(",")],
                        help="class numbers drawn in turn, e.g. 1,3 (default: every class)")
    parser.add_argument("--dask", default=os.environ.get(DASK_ADDRESS_ENV),
                        help=f"Dask scheduler address for the shards (default ${DASK_ADDRESS_ENV}; none: this process)")
    args = parser.parse_args(argv)
    run_id = sample_model_flow(args.dask)(
        model=args.model, version=args.version, alias=args.alias, num_samples=args.num_samples,
        shard_size=args.shard_size, sampler=args.sampler, steps=args.steps, eta=args.eta, guidance=args.guidance,
        seed=args.seed, classes=args.classes)
    print(f"MLflow run {run_id}")


if __name__ == "__main__":
    main()
