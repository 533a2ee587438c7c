"""The training loop: L_simple with AdamW, warm-up, gradient clipping, EMA, optional bf16 autocast.

Reproducibility: the global batch is the unit of randomness. Its examples (a per-epoch permutation
seeded by (seed, epoch)), its t and its ε are drawn for the whole global batch from seeded streams,
and each rank takes its slice. So a run is a function of the seed alone; resuming from a checkpoint
continues it exactly; and DDP with W ranks computes the same update as one process with the same
global batch.

Resuming and continuing are different things. Resuming (the run folder holds a checkpoint) finishes the
same run, bit for bit; given more train.steps, its learning-rate plan is re-planned from the rate it has
reached (LearningRatePlan.extended), never jumping. Continuing (`continue_from`: another run's training
checkpoint, e.g. the registered champion's) is a new run that starts from that run's full state
(weights, EMA, optimizer, RNG streams, step and so data-order position) and trains train.steps more
under train.continue_schedule, averaging with the power-function EMA of train.continue_ema_std; the
checkpoint's config and dataset version are checked first.

Run folder layout (`run_dir`):
  checkpoints/last.safetensors   training checkpoint (atomic)     model/   exported EMA model
  metrics.jsonl                  one JSON line per report         forward_process.png, loss_curve.png
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .atomic import atomic_write_text
from .checkpoint import (CheckpointError, build_denoiser, export_model, load_training_checkpoint,
                         save_training_checkpoint)
from .config import Config, ConfigError, config_from_dict
from .data import prepare_dataset
from .distributed import DistContext, destroy_process_group, init_process_group, resolve_device
from .ema import EMA
from .figures import new_figure, save_png
from .forward import save_forward_process_grid
from .guidance import drop_labels
from .images import to_model_space
from .noise_levels import TimestepDraw, timestep_probabilities
from .runtime import tune_cpu_runtime

MetricsCallback = Callable[[int, dict[str, float]], None]
CHECKPOINT = Path("checkpoints") / "last.safetensors"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite. The last good checkpoint is left as it was."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_loss: float
    images_per_s: float
    dataset_sha256: str


class ContinuationMismatch(ConfigError):
    """The training state to continue from was made with other settings or other data."""


def learning_rate(step: int, peak: float, warmup_steps: int, total_steps: int = 0, decay: str = "none") -> float:
    """Linear warm-up from peak/warmup to peak over `warmup_steps`; then constant (`decay` "none"),
    or half a cosine from peak down to 0 at `total_steps` ("cosine", Loshchilov & Hutter 2017).
    `decay` is one of config.LR_DECAYS, checked when the config is built."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if decay == "none":
        return peak
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class LearningRatePlan:
    """The learning rate of steps [start, end): `learning_rate(step − start, peak, warmup, end − start, decay)`.
    A fresh run plans [0, train.steps); a continuation [s, s + train.steps) from the step s it continues."""

    start: int
    end: int
    peak: float
    warmup: int
    decay: str

    @classmethod
    def for_run(cls, train_config, start: int, continuing: bool = False) -> LearningRatePlan:
        """The plan of `train.steps` steps from `start`: warm-up then train.lr_decay; a continuation with
        train.continue_schedule "constant" keeps train.lr throughout (the optimizer state is warm)."""
        cfg = train_config
        if continuing and cfg.continue_schedule == "constant":
            return cls(start, start + cfg.steps, cfg.lr, 0, "none")
        return cls(start, start + cfg.steps, cfg.lr, cfg.warmup_steps, cfg.lr_decay)

    def at(self, step: int) -> float:
        return learning_rate(step - self.start, self.peak, self.warmup, self.end - self.start, self.decay)

    def extended(self, step: int, end: int) -> LearningRatePlan:
        """This plan with its last step moved to `end`, as seen from `step` (a resumed run given other
        train.steps): unchanged up to `step`, so the rate never jumps. Before the decay has begun only the end
        moves; after, the decay is re-planned from the rate reached at `step` down to 0 at `end`."""
        if end == self.end or self.decay == "none" or step < self.start + self.warmup or step >= end:
            return LearningRatePlan(self.start, end, self.peak, self.warmup, self.decay)
        rate = self.at(step)
        if rate <= 0:
            raise ConfigError(f"this run's learning rate has decayed to {rate:g} at step {step} of its plan "
                              f"[{self.start}, {self.end}); training it to step {end} would not learn. Continue the "
                              "trained model as a new run instead (diffusion train --continue-from "
                              "<run>/checkpoints/last.safetensors), which plans a schedule of its own")
        return LearningRatePlan(step, end, rate, 0, self.decay)


class GlobalBatches:
    """Indices of the global batch at any step: epoch e uses randperm seeded by (seed, e), batches
    of `batch_size` in order, the incomplete tail dropped. Stateless, so resuming needs only the step."""

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        if batch_size > num_examples:
            raise ConfigError(f"train.batch_size={batch_size} exceeds the {num_examples} training examples")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.batches_per_epoch = num_examples // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_examples, generator=generator)
        return self._perm[position * self.batch_size:(position + 1) * self.batch_size]


RESUME_FREE = frozenset({"steps", "log_every", "checkpoint_every", "device"})
# Continuing a trained model may also change how it is optimised from here on, not what it learns.
CONTINUE_FREE = RESUME_FREE | {"lr", "warmup_steps", "lr_decay", "continue_schedule", "grad_clip", "bf16", "compile",
                               "ema_decay", "ema_std", "continue_ema_std"}


def _check_resumable(saved: dict, config: Config, free: frozenset[str] = RESUME_FREE,
                     error: type[ConfigError] = ConfigError, what: str = "the run folder holds a checkpoint",
                     fix: str = "use a new run folder, or pass the same settings to resume") -> None:
    """A run may be resumed with more steps or other reporting intervals, nothing else (continued: `free`)."""
    current = config.to_dict()
    saved = config_from_dict(saved).to_dict()  # fills settings added since the checkpoint with their defaults
    saved_train = {k: v for k, v in saved["train"].items() if k not in free}
    current_train = {k: v for k, v in current["train"].items() if k not in free}
    differs = [f"{s}.{k}: {saved[s].get(k)!r} → {v!r}" for s in ("model", "diffusion")
               for k, v in current[s].items() if saved[s].get(k) != v]
    differs += [f"train.{k}: {saved_train.get(k)!r} → {v!r}" for k, v in current_train.items() if saved_train.get(k) != v]
    if saved["data"]["dataset"] != current["data"]["dataset"]:
        differs.append(f"data.dataset: {saved['data']['dataset']!r} → {current['data']['dataset']!r}")
    if differs:
        raise error(f"{what} made with other settings ({'; '.join(differs)}); {fix}")


def check_continuable(saved: dict, config: Config, what: str = "the training state") -> None:
    """ContinuationMismatch naming each setting (both values) that a continuation may not change."""
    _check_resumable(saved, config, CONTINUE_FREE, ContinuationMismatch, f"{what} was",
                     "train it fresh, or continue with its settings")


def train(config: Config, run_dir: str | Path, *, resume: bool = True, progress: bool = True,
          on_metrics: MetricsCallback | None = None, continue_from: str | Path | None = None,
          allow_new_data: bool = False) -> TrainResult:
    """Train `config` in `run_dir` (resuming from its checkpoint if there is one). With `continue_from`
    (a training checkpoint of another run) and nothing to resume, start from that state and train
    train.steps more; its config must match (CONTINUE_FREE may differ) and so must its dataset version
    unless `allow_new_data`, else ContinuationMismatch names both. DDP when launched by torchrun
    (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA; rank 0 alone writes files and reports."""
    ctx = DistContext.from_environ()
    cfg = config.train
    if cfg.batch_size % ctx.world_size:
        raise ConfigError(f"train.batch_size={cfg.batch_size} must be divisible by the {ctx.world_size} processes")
    device = resolve_device(cfg.device, ctx)
    tune_cpu_runtime()
    init_process_group(ctx, device)
    try:
        return _train(config, Path(run_dir), ctx, device, resume, progress, on_metrics,
                      None if continue_from is None else Path(continue_from), allow_new_data)
    finally:
        destroy_process_group()


def _train(config: Config, run_dir: Path, ctx: DistContext, device: torch.device, resume: bool,
           progress: bool, on_metrics: MetricsCallback | None, continue_from: Path | None,
           allow_new_data: bool) -> TrainResult:
    cfg = config.train
    # One process fetches and converts; the others wait and then read the cache. Under torchrun the launcher
    # prepared it (launch.prepare_for_ranks) and the ranks, which hold no storage credentials, read that.
    launched = "TORCHELASTIC_RUN_ID" in os.environ
    if ctx.is_main:
        dataset = prepare_dataset(config.data.dataset, config.data.source, config.data.data_dir,
                                  consult_source=not launched)
    ctx.barrier()
    if not ctx.is_main:
        dataset = prepare_dataset(config.data.dataset, config.data.source, config.data.data_dir, consult_source=False)
    images_u8, labels = dataset.load("train")
    images_u8, labels = images_u8.to(device), labels.to(device)
    batches = GlobalBatches(images_u8.shape[0], cfg.batch_size, cfg.seed)
    local = cfg.batch_size // ctx.world_size
    mine = slice(ctx.rank * local, (ctx.rank + 1) * local)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    denoiser = build_denoiser(config).to(device)
    schedule = denoiser.schedule
    optimizer = torch.optim.AdamW(denoiser.net.parameters(), lr=cfg.lr, betas=cfg.adam_betas,
                                  weight_decay=cfg.weight_decay, fused=True)  # one kernel for all parameters
    noise_rng = torch.Generator(device).manual_seed(cfg.seed + 1)
    # p(t): None for uniform draws, else a table
    t_probs = None if cfg.noise_levels == "uniform" else timestep_probabilities(
        schedule, cfg.noise_levels, log_snr_mean=cfg.log_snr_mean, log_snr_std=cfg.log_snr_std).float().to(device)
    draw_t = TimestepDraw(t_probs, schedule.timesteps, stratified=cfg.stratified_noise_levels)
    torch.manual_seed(cfg.seed + 2 + ctx.rank)  # dropout: independent per rank

    start_step = origin = 0
    checkpoint_path = run_dir / CHECKPOINT
    plan = LearningRatePlan.for_run(cfg, 0)
    if resume and checkpoint_path.is_file():
        state = load_training_checkpoint(checkpoint_path)
        _check_resumable(state.config, config)
        if state.dataset_sha256 not in (None, dataset.sha256):
            raise ConfigError(f"the checkpoint in {run_dir} was trained on dataset version {state.dataset_sha256}, "
                              f"but {config.data.data_dir} holds version {dataset.sha256}; resume with the same "
                              "data, or use a new run folder")
        origin = state.start_step
        saved_plan = (LearningRatePlan(**state.lr_plan) if state.lr_plan is not None
                      else LearningRatePlan.for_run(config_from_dict(state.config).train, 0))
        plan = saved_plan.extended(state.step, origin + cfg.steps)
        if plan != saved_plan and ctx.is_main:
            print(f"train.steps changed: the learning-rate plan {saved_plan} is re-planned from step {state.step} "
                  f"as {plan} (no jump: {saved_plan.at(state.step):.3g} there either way)", flush=True)
    elif continue_from is not None:
        state = load_training_checkpoint(continue_from)
        check_continuable(state.config, config, f"the training state {continue_from}")
        if state.dataset_sha256 != dataset.sha256 and not allow_new_data:
            raise ContinuationMismatch(
                f"the training state {continue_from} was trained on dataset version {state.dataset_sha256}, but "
                f"{config.data.data_dir} holds version {dataset.sha256}; continue on the new data explicitly "
                "(allow_new_data, --allow-new-data) or train fresh")
        origin = state.step
        plan = LearningRatePlan.for_run(cfg, origin, continuing=True)
    else:
        state = None
    ema = EMA(denoiser.net, cfg.ema_decay, cfg.ema_std_for(continuing=origin > 0))  # origin > 0: a continuation
    if state is not None:
        denoiser.net.load_state_dict(state.model)
        ema.model.load_state_dict(state.ema)
        ema.num_updates = state.ema_updates
        optimizer.load_state_dict(state.optimizer)
        noise_rng.set_state(state.rng["noise"])
        if f"torch_rank{ctx.rank}" in state.rng:
            torch.set_rng_state(state.rng[f"torch_rank{ctx.rank}"])
        start_step = state.step
    end_step = origin + cfg.steps

    objective: torch.nn.Module = TrainingObjective(denoiser)
    if ctx.enabled:  # gradients are averaged across ranks inside backward()
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # after the DDP wrap, so compiled graphs break at DDP's bucket boundaries
        objective = torch.compile(objective)

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(run_dir / "metrics.jsonl", start_step)  # reports past the checkpoint are redone
        if start_step == origin:  # a new run (fresh or continuing), not a resumed one
            save_forward_process_grid(schedule, to_model_space(images_u8[:4].cpu()), run_dir / "forward_process.png")

    image_shape = tuple(images_u8.shape[1:])
    loss_sum = torch.zeros((), device=device)
    bad_step = torch.full((), -1, device=device, dtype=torch.long)
    last_report_step, last_report_time = start_step, time.perf_counter()
    result_loss, result_ips = float("nan"), 0.0
    bar = tqdm(total=end_step, initial=start_step, desc="train", disable=not (progress and ctx.is_main),
               dynamic_ncols=True)
    denoiser.train()
    for step in range(start_step, end_step):
        index = batches.indices(step).to(device)  # the global batch; this rank takes its slice `mine`
        x0 = to_model_space(images_u8[index[mine]])
        t = draw_t(cfg.batch_size, noise_rng)[mine]
        noise = torch.randn((cfg.batch_size, *image_shape), generator=noise_rng, device=device)[mine]
        cond = {}
        if config.conditional:  # drawn for the global batch too, so DDP keeps the single-process math
            cond["class_labels"] = drop_labels(labels[index], cfg.label_dropout, config.model.num_classes,
                                               noise_rng)[mine]
        if config.model.self_condition:  # half the images get the network's own first estimate of x0 as input
            cond["self_conditioned"] = (torch.rand(cfg.batch_size, generator=noise_rng, device=device) < 0.5)[mine]
        for group in optimizer.param_groups:
            group["lr"] = plan.at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = objective(x0, t, noise, **cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(denoiser.net.parameters(), cfg.grad_clip)
        optimizer.step()
        ema.update(denoiser.net)
        loss = loss.detach()
        loss_sum += loss
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)

        done = step + 1
        if done % cfg.log_every == 0 or done == end_step or done % cfg.checkpoint_every == 0:
            if ctx.enabled:  # one sync per report: average the loss, agree on divergence
                dist.all_reduce(loss_sum)
                loss_sum /= ctx.world_size
                dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
            if int(bad_step) >= 0:
                bar.close()
                raise TrainingDiverged(
                    f"non-finite loss at step {int(bad_step) + 1}; training stopped and the last good checkpoint "
                    f"({checkpoint_path}) was kept. Lower train.lr, enable train.grad_clip or disable train.bf16."
                )
            n = done - last_report_step
            mean_loss = float(loss_sum) / n
            now = time.perf_counter()
            ips = n * cfg.batch_size / (now - last_report_time)
            last_report_step, last_report_time, loss_sum = done, now, torch.zeros((), device=device)
            result_loss, result_ips = mean_loss, ips
            bar.update(n)
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}")
            metrics = {"loss": mean_loss, "lr": optimizer.param_groups[0]["lr"], "images_per_s": ips,
                       "ema_decay": ema.current_decay()}
            if ctx.is_main:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": done, **metrics}) + "\n")
                if on_metrics is not None:
                    on_metrics(done, metrics)
            if done % cfg.checkpoint_every == 0 or done == end_step:
                _save(run_dir, done, config, denoiser, ema, optimizer, noise_rng, ctx, dataset.sha256, origin, plan)
    bar.close()

    if ctx.is_main:
        export_model(run_dir / "model", ema.model, config,
                     {"step": max(start_step, end_step), "start_step": origin, "dataset_sha256": dataset.sha256,
                      "images_seen": max(start_step, end_step) * cfg.batch_size})
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    ctx.barrier()
    return TrainResult(run_dir, max(start_step, end_step), result_loss, result_ips, dataset.sha256)


class TrainingObjective(torch.nn.Module):
    """The loss as a module's forward(), which is what DistributedDataParallel wraps."""

    def __init__(self, denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, **cond) -> torch.Tensor:
        return self.denoiser.loss(x0, t, noise, **cond)


def _save(run_dir: Path, step: int, config: Config, denoiser, ema: EMA, optimizer, noise_rng, ctx: DistContext,
          dataset_sha256: str, start_step: int, plan: LearningRatePlan) -> None:
    rng = {"noise": noise_rng.get_state(), f"torch_rank{ctx.rank}": torch.get_rng_state()}
    if ctx.enabled:  # every rank's dropout stream, so each resumes its own
        gathered: list = [None] * ctx.world_size
        dist.all_gather_object(gathered, torch.get_rng_state())
        rng.update({f"torch_rank{r}": s for r, s in enumerate(gathered)})
    if ctx.is_main:
        save_training_checkpoint(run_dir / CHECKPOINT, step=step, config=config, model=denoiser.net,
                                 ema_model=ema.model, ema_updates=ema.num_updates, optimizer=optimizer, rng=rng,
                                 dataset_sha256=dataset_sha256, start_step=start_step, lr_plan=asdict(plan))


def truncate_metrics(metrics_file: Path, step: int) -> None:
    """Keep only the reports up to `step` (atomically), so a resumed run writes each step once.

    A torn last line (a run killed while writing it) is dropped. Any other line that is not a report is
    a CheckpointError naming the file and line: the run folder was damaged, and resuming would hide it."""
    if not metrics_file.is_file():
        return
    text = metrics_file.read_text()
    lines = text.splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            report = json.loads(line)
            reported_step = int(report["step"])
        except (ValueError, TypeError, KeyError) as exc:
            if number == len(lines):
                break
            raise CheckpointError(f"{metrics_file}, line {number}, is not a training report ({exc}): {line[:80]!r}; "
                                  "repair or delete that line to resume, or use a new run folder") from exc
        if reported_step <= step:
            kept.append(line)
    if len(kept) < len(lines) or not text.endswith("\n"):
        atomic_write_text(metrics_file, "".join(f"{line}\n" for line in kept))


def plot_loss_curve(metrics_file: Path, png: Path) -> Path | None:
    """Loss (log scale) against step from metrics.jsonl."""
    if not metrics_file.is_file():
        return None
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if math.isfinite(r["loss"])]
    fig, ax = new_figure()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="training loss (MSE)", yscale="log", title="training loss")
    ax.grid(alpha=0.3)
    save_png(fig, png)
    return png

