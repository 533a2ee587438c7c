"""Typed configuration: the one source of defaults. Presets in `diffusion_core/presets/*.toml`
(package data) override these defaults; `section.field=value` overrides (CLI `--set`, flow
parameters) override presets.

Every value is validated when the config is built; an error names the field and what it accepts.
Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import DATASETS
from .denoiser import PREDICTIONS
from .noise_levels import LOSS_WEIGHTINGS, NOISE_LEVEL_DISTRIBUTIONS
from .samplers import SAMPLERS, SPACINGS, default_spacing, default_steps, few_step_levels
from .schedule import SCHEDULE_KINDS, NoiseSchedule
from .unet import UNetConfig

PRESET_DIR = Path(__file__).resolve().parent / "presets"  # shipped in the package (pyproject package-data)
# The preset of the README's first command, of `diffusion` commands without --preset and of the nightly deployment:
# the mnist-cpu recipe made class-conditional, sampled with balanced classes (docs/training-recipe.md).
DEFAULT_PRESET = "mnist-cpu-cond"
# Environment variables that override a config field (documented in .env.example).
ENV_OVERRIDES = {"DIFFUSION_DATA_SOURCE": "data.source", "DIFFUSION_DATA_DIR": "data.data_dir"}


LR_DECAYS = ("none", "cosine")
CONTINUE_SCHEDULES = ("restart", "constant")
# Settings that moved out of the config, and where they went: a stored record (config.json of an older run or
# model) still loads without them; a preset or override that sets one is refused with this pointer.
RETIRED = {"evaluation.promotion_sigmas": "the registered model's gate (python -m flows.gate set --promotion-sigmas)",
           "evaluation.min_improvement": "the registered model's gate (python -m flows.gate set --min-improvement)"}
# The fewest images the evaluator scores (evaluation.metrics): precision/recall look for each image's 3 nearest
# neighbours among the others of its set, so a set needs 4; FID's covariance and KID's unbiased MMD need fewer.
MIN_SCORED_IMAGES = 4


class ConfigError(ValueError):
    """An invalid configuration value or key. The message names the field and the allowed values."""


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"     # one of data.DATASETS
    source: str = "download"   # local folder with the raw files, s3://bucket/prefix, or "download"
    data_dir: str = "data"     # cache folder for raw downloads and the canonical file

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.dataset in DATASETS, f"data.dataset={self.dataset!r} is unknown; choose one of {', '.join(DATASETS)}")
        _check(p, bool(self.source), "data.source must be a folder, s3://bucket/prefix or 'download'")
        _raise_if(p)


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000      # T, number of forward-process steps
    schedule: str = "linear"   # "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal)
    prediction: str = "eps"    # what the network predicts: "eps", "x0" or "v"

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.timesteps >= 2, f"diffusion.timesteps must be >= 2, got {self.timesteps}")
        _check(p, self.schedule in SCHEDULE_KINDS, f"diffusion.schedule={self.schedule!r} is unknown; choose one of {', '.join(SCHEDULE_KINDS)}")
        _check(p, self.prediction in PREDICTIONS, f"diffusion.prediction={self.prediction!r} is unknown; choose one of {', '.join(PREDICTIONS)}")
        _raise_if(p)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000            # optimizer steps
    batch_size: int = 64         # global batch (images per optimizer step, summed over all ranks)
    lr: float = 1e-3             # AdamW peak learning rate
    warmup_steps: int = 200      # linear learning-rate warm-up from 0, in steps
    lr_decay: str = "none"       # after warm-up: "none" (constant) or "cosine" (to 0 at train.steps)
    continue_schedule: str = "constant"  # continuing a trained model for train.steps more: "constant" (train.lr
                                 # throughout) or "restart" (warm-up and lr_decay again over those steps)
    continue_ema_std: float = 0.1  # continuing: power-function EMA (EDM2) of this relative length; 0 = train.ema_std's
    weight_decay: float = 0.0    # AdamW decoupled weight decay
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0       # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.999     # EMA decay ceiling; warmed up as min(decay, (1 + n) / (10 + n))
    ema_std: float = 0.0         # > 0: power-function EMA (EDM2) of this relative length instead; ema_decay unused
    noise_levels: str = "uniform"  # how t is drawn: "uniform" or "log_snr_normal" (log SNR ~ N(mean, std²))
    log_snr_mean: float = 2.4    # log_snr_normal: mean of log SNR (EDM's P_mean = −1.2 on ln σ is 2.4)
    log_snr_std: float = 2.4     # log_snr_normal: its standard deviation (EDM's P_std = 1.2 on ln σ is 2.4)
    stratified_noise_levels: bool = False  # one t per 1/batch of p(t)'s mass (VDM's low-discrepancy draw), not independent
    loss_weighting: str = "none"  # w(t) on the squared error: "none" (L_simple) or "min_snr" (Min-SNR-γ)
    min_snr_gamma: float = 5.0   # min_snr: the SNR at which the x̂0 error's weight stops growing
    bf16: bool = False           # bfloat16 autocast (GPUs, or CPUs with AMX/AVX512-BF16; emulated and far slower elsewhere)
    compile: bool = False        # torch.compile the training step's model (first steps pay the compile time)
    label_dropout: float = 0.1   # class-conditional models: chance a label is replaced by "no class" (CFG)
    seed: int = 0                # seeds the weights, data order, t and ε
    device: str = "auto"         # "auto" (cuda if available), "cpu", "cuda", "cuda:1", …
    log_every: int = 50          # steps between loss/throughput reports (one host sync each)
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        p: list[str] = []
        _check(p, self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _check(p, self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(p, self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(p, self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(p, self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(p, len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
               f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        _check(p, self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        _check(p, 0 <= self.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        _check(p, 0 <= self.ema_std < 0.28, f"train.ema_std must be in [0, 0.28) (0 = fixed decay), got {self.ema_std}")
        _check(p, 0 <= self.continue_ema_std < 0.28,
               f"train.continue_ema_std must be in [0, 0.28) (0 = keep train.ema_std), got {self.continue_ema_std}")
        _check(p, self.lr_decay in LR_DECAYS, f"train.lr_decay={self.lr_decay!r} is unknown; choose one of {', '.join(LR_DECAYS)}")
        _check(p, self.continue_schedule in CONTINUE_SCHEDULES, f"train.continue_schedule={self.continue_schedule!r} "
               f"is unknown; choose one of {', '.join(CONTINUE_SCHEDULES)}")
        _check(p, self.noise_levels in NOISE_LEVEL_DISTRIBUTIONS,
               f"train.noise_levels={self.noise_levels!r} is unknown; choose one of {', '.join(NOISE_LEVEL_DISTRIBUTIONS)}")
        _check(p, self.log_snr_std > 0, f"train.log_snr_std must be > 0, got {self.log_snr_std}")
        _check(p, self.loss_weighting in LOSS_WEIGHTINGS,
               f"train.loss_weighting={self.loss_weighting!r} is unknown; choose one of {', '.join(LOSS_WEIGHTINGS)}")
        _check(p, self.min_snr_gamma > 0, f"train.min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        _check(p, 0 <= self.label_dropout <= 1, f"train.label_dropout must be in [0, 1], got {self.label_dropout}")
        _check(p, self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _check(p, self.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        _check(p, self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
               f"train.device={self.device!r} is unknown; use auto, cpu, cuda, cuda:N or mps")
        _raise_if(p)

    def ema_std_for(self, continuing: bool) -> float:
        """The EMA's relative length (0 = the fixed decay train.ema_decay): train.continue_ema_std when continuing
        a trained model and it is set, else train.ema_std. Chosen by measurement: after four nights, continuations
        sampled from the power-function EMA scored 0.98x an uninterrupted run of the same steps, the fixed EMA 1.30x
        (docs/operations.md, "The continuation schedule")."""
        return self.continue_ema_std if continuing and self.continue_ema_std > 0 else self.ema_std


@dataclass(frozen=True)
class SampleConfig:
    """How to sample: the one settings object the CLI, evaluate() and the flows hand to generate_batches."""

    sampler: str = "ddim"        # "ddpm" (ancestral), "ddim", "dpm++2m" (DPM-Solver++ 2M) or "dpm++2m-sde" (SDE)
    steps: int | None = None     # network evaluations; unset: all T for ddpm, else 50 (samplers.default_steps)
    eta: float = 0.0             # DDIM stochasticity: 0 deterministic … 1 ancestral (= ddpm)
    sde_noise: float = 1.0       # dpm++2m-sde: noise η of its reverse SDE, 1 = Lu et al.'s, more re-noises more each
                                 # step (samplers.dpm_solver_sample); η = 0.5 / 0.75 / 1 / 1.5 / 2 scored
                                 # 3.81 / 3.35 / 3.25 / 3.41 / 3.91 (docs/sampling.md)
    spacing: str | None = None   # timesteps "linear" in t or even in "log_snr"; unset: log_snr for dpm++*, else linear
    levels_log_snr: tuple[float, ...] = ()  # consistency sampler: log SNR of its levels after T−1 (steps − 1 of them,
                                            # increasing), in place of spacing's; () = spacing's levels
    num_samples: int = 64        # images to generate
    batch_size: int = 256        # images per network call
    clip_x0: bool = True         # clip x̂0 to [-1, 1] at every step
    seed: int = 0                # sampling seed (initial noise and any per-step noise)
    guidance: float = 0.0        # class-conditional models: guidance weight w, ε̂ = (1+w)·ε̂(x,c) − w·ε̂(x,∅)
    guidance_sweep: tuple[float, ...] = (0.0, 1.0, 3.0, 5.0)  # weights the pipeline also evaluates (conditional)
    nfe_sweep: tuple[int, ...] = ()  # network evaluations at which the pipeline also scores DDIM and DPM-Solver++ (ODE, SDE)

    def __post_init__(self) -> None:
        object.__setattr__(self, "guidance_sweep", tuple(self.guidance_sweep))
        object.__setattr__(self, "nfe_sweep", tuple(self.nfe_sweep))
        object.__setattr__(self, "levels_log_snr", tuple(self.levels_log_snr))
        p: list[str] = []
        _check(p, self.sampler in SAMPLERS, f"sample.sampler={self.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
        _check(p, self.steps is None or self.steps >= 1, f"sample.steps must be >= 1 (or unset), got {self.steps}")
        _check(p, 0 <= self.eta <= 1, f"sample.eta must be in [0, 1], got {self.eta}")
        _check(p, self.sde_noise > 0,
               f"sample.sde_noise must be > 0 (for no noise use sampler dpm++2m), got {self.sde_noise}")
        _check(p, self.sde_noise == 1 or self.sampler == "dpm++2m-sde",
               f"sample.sde_noise={self.sde_noise} is a setting of the dpm++2m-sde sampler, not of {self.sampler!r}; "
               "leave it at 1")
        _check(p, self.spacing is None or self.spacing in SPACINGS,
               f"sample.spacing={self.spacing!r} is unknown; choose one of {', '.join(SPACINGS)} (or leave it unset)")
        levels = list(self.levels_log_snr)
        _check(p, not levels or self.sampler == "consistency",
               f"sample.levels_log_snr={levels} is a setting of the consistency sampler, not of {self.sampler!r}; "
               "leave it empty")
        _check(p, all(a < b for a, b in zip(levels, levels[1:])),
               f"sample.levels_log_snr={levels} must increase (each level cleaner than the one before)")
        _check(p, not levels or self.steps is None or self.steps == len(levels) + 1,
               f"sample.steps={self.steps} with {len(levels)} sample.levels_log_snr: the consistency sampler visits "
               f"T−1 and then those levels, {len(levels) + 1} steps; set steps={len(levels) + 1} or leave it unset")
        _check(p, self.num_samples >= 1, f"sample.num_samples must be >= 1, got {self.num_samples}")
        _check(p, self.batch_size >= 1, f"sample.batch_size must be >= 1, got {self.batch_size}")
        _check(p, self.guidance >= 0, f"sample.guidance must be >= 0 (0 = plain conditional sampling), got {self.guidance}")
        _check(p, all(w >= 0 for w in self.guidance_sweep),
               f"sample.guidance_sweep must hold weights >= 0, got {self.guidance_sweep}")
        _check(p, all(n >= 1 for n in self.nfe_sweep), f"sample.nfe_sweep must hold step counts >= 1, got {self.nfe_sweep}")
        _raise_if(p)

    def override(self, **changes: Any) -> SampleConfig:
        """These settings with `changes` (None values ignored). Another sampler drops the configured steps,
        spacing, levels and SDE noise unless they are given too: they were chosen for the configured sampler (DDIM's
        50 steps are no DDPM setting), so the new one takes its own defaults. Another step count or a spacing
        asked for drops the configured levels_log_snr, which hold one step count's levels; levels asked for
        without steps set the steps to theirs."""
        changes = {key: value for key, value in changes.items() if value is not None}
        if changes.get("levels_log_snr") and "steps" not in changes:
            changes["steps"] = len(changes["levels_log_snr"]) + 1
        if changes.get("sampler", self.sampler) != self.sampler:
            changes = {"steps": None, "spacing": None, "levels_log_snr": (), "sde_noise": 1.0, **changes}
        elif self.levels_log_snr and "levels_log_snr" not in changes:
            own_steps = len(self.levels_log_snr) + 1
            if "spacing" in changes or changes.get("steps", own_steps) != own_steps:
                changes = {"levels_log_snr": (), **changes}
        return dataclasses.replace(self, **changes)

    def resolved(self, timesteps: int) -> SampleConfig:
        """These settings with unset steps and spacing filled in for a model of `timesteps` steps."""
        steps = self.steps or (len(self.levels_log_snr) + 1 if self.levels_log_snr else None)
        return dataclasses.replace(self, steps=steps or default_steps(self.sampler, timesteps),
                                   spacing=self.spacing or default_spacing(self.sampler))


@dataclass(frozen=True)
class EvaluationConfig:
    """How the pipeline scores a model for the champion decision: its own sample budget, apart from the
    picture grids (sample.num_samples). The rule that turns two scores into a promotion belongs to the
    registered model (flows.gate), and so does the protocol once the model exists."""

    num_samples: int = 1000        # images of the primary sampler that are scored (N = 64 spreads more than most gains)
    bootstrap: int = 100           # resamples of the generated images' features that give fid_std; 0 = no fid_std

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.num_samples >= 10, f"evaluation.num_samples must be >= 10, got {self.num_samples}")
        _check(p, self.bootstrap == 0 or self.bootstrap >= 10,
               f"evaluation.bootstrap must be 0 (off) or >= 10 resamples, got {self.bootstrap}")
        _raise_if(p)


DISTILL_METHODS = ("consistency", "progressive")
DISTILL_WEIGHTINGS = ("none", "min_snr", "truncated_snr")
DISTILL_METRICS = ("l2", "pseudo_huber")
TEACHER_PRECISIONS = ("fp32", "bf16", "auto")


@dataclass(frozen=True)
class DistillConfig:
    """How `diffusion distill` turns a trained model (the teacher) into a few-step student: consistency
    distillation (Song et al. 2023, Alg. 2) or progressive distillation (Salimans & Ho 2022, Alg. 2);
    diffusion_core/distill.py. Unused by ordinary training."""

    method: str = "consistency"  # one of DISTILL_METHODS
    steps: int = 2000            # optimizer steps of the student
    batch_size: int = 64         # images per step
    lr: float = 4e-4             # Adam learning rate after the warm-up (Song et al. 2023: 4e-4 for CD)
    warmup_steps: int = 100      # linear warm-up from 0, in steps
    lr_decay: str = "none"       # after warm-up: "none" (constant) or "cosine" (to 0 at distill.steps; progressive:
                                 # over all its stages together)
    grad_clip: float = 1.0       # max global gradient norm; 0 disables clipping
    prediction: str = "v"        # what the student's network predicts: "v" (x̂0 well-conditioned everywhere) or
                                 # "eps" (the teacher's own head, so the student starts as the teacher's x̂0)
    loss_weighting: str = "none"  # w(t) on the x̂0 error: "none", "min_snr", min(SNR_t, 1) (bounds an ε-student's
                                  # gradient, 1/SNR_t times its ε error, at the top of the chain), or "truncated_snr",
                                  # max(SNR_t, 1) (Salimans & Ho 2022)
    loss_metric: str = "l2"       # per image, of e² = w(t)·(mean squared x̂0 error over pixels): "l2", e², or
                                  # "pseudo_huber", √(e² + c²) − c with c = 0.00054 (Song & Dhariwal 2023, §3.3: their
                                  # c = 0.00054·√D on the norm over D pixels, divided by √D), which grows as |e|
    ode_steps: int = 32          # consistency: one teacher ODE step spans 1/N of the schedule's usable log-SNR range;
                                 # progressive: the first student's levels (its teacher takes 2N), halved down to
                                 # sample_steps, so N = sample_steps·2^K
    teacher_order: int = 1       # consistency: order of the teacher's ODE step, 1 (DDIM) or 2 (DPM-Solver++(2S), one
                                 # more teacher evaluation halfway in log SNR; local error O(h³) against O(h²))
    level_focus: float = 0.0     # consistency: the share of the student's noise levels t drawn at the levels its own
                                 # sampler evaluates (T−1 and sample_levels_log_snr, equally); the rest even in log SNR
    teacher_precision: str = "fp32"  # the passes that need no gradient (the teacher's, the target network's): "fp32",
                                     # "bf16" (autocast, outputs back in fp32), or "auto": bf16 where it was measured
                                     # faster, CPUs with AMX or AVX512-BF16 (1.25–1.29× and 1.25–1.38× steps/s; on
                                     # CPUs without either bf16 is emulated and far slower), else fp32
                                     # (runtime.fast_bf16_cpu)
    target_ema: float = 0.95     # μ of the target network θ⁻ ← μ·θ⁻ + (1 − μ)·θ (Song et al. 2023: 0.95 for CD)
    ema_decay: float = 0.999     # EMA of the student, the weights that are exported and sampled: a ceiling on the
                                 # warm-up min(decay, (1 + n) / (10 + n)), which stays below 0.999 until step 8,990,
                                 # so shorter runs average as the warm-up does (0.995 and 0.998 give the same weights
                                 # in 1,750 steps; 0.99 scores 7.55 against 7.29 there; docs/sampling.md)
    sample_steps: int = 4        # network evaluations of the student's sampler (its sample.steps)
    sample_levels_log_snr: tuple[float, ...] = ()  # consistency students: log SNR of the levels after T−1 (its
                                                   # sample.levels_log_snr, sample_steps − 1 of them); () = levels
                                                   # even in log SNR, the only ones a progressive student learns
    guidance: float = 0.0        # class-conditional teachers: the guidance weight w of the teacher's steps, so the
                                 # student learns the guided ODE (Meng et al. 2023) and samples it at guidance 0
    seed: int = 0                # data order, noise levels and noise of the distillation
    log_every: int = 50          # steps between metrics.jsonl reports

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_levels_log_snr", tuple(self.sample_levels_log_snr))
        p: list[str] = []
        _check(p, self.method in DISTILL_METHODS,
               f"distill.method={self.method!r} is unknown; choose one of {', '.join(DISTILL_METHODS)}")
        _check(p, self.steps >= 1, f"distill.steps must be >= 1, got {self.steps}")
        _check(p, self.batch_size >= 1, f"distill.batch_size must be >= 1, got {self.batch_size}")
        _check(p, self.lr > 0, f"distill.lr must be > 0, got {self.lr}")
        _check(p, self.warmup_steps >= 0, f"distill.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(p, self.lr_decay in LR_DECAYS, f"distill.lr_decay={self.lr_decay!r} is unknown; choose one of "
               f"{', '.join(LR_DECAYS)}")
        _check(p, self.grad_clip >= 0, f"distill.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        _check(p, self.prediction in ("v", "eps"), f"distill.prediction={self.prediction!r} is unknown; choose v or eps")
        _check(p, self.loss_weighting in DISTILL_WEIGHTINGS, f"distill.loss_weighting={self.loss_weighting!r} "
               f"is unknown; choose one of {', '.join(DISTILL_WEIGHTINGS)}")
        _check(p, 0 <= self.level_focus < 1, f"distill.level_focus must be in [0, 1) (a share of the noise levels), "
               f"got {self.level_focus}")
        _check(p, self.method != "progressive" or self.level_focus == 0,
               f"distill.level_focus={self.level_focus} with progressive distillation: its students draw their own "
               "stage's levels; leave it at 0 (or set distill.method=consistency)")
        _check(p, self.loss_metric in DISTILL_METRICS, f"distill.loss_metric={self.loss_metric!r} is unknown; "
               f"choose one of {', '.join(DISTILL_METRICS)}")
        _check(p, self.ode_steps >= 2, f"distill.ode_steps must be >= 2, got {self.ode_steps}")
        halvings = self.ode_steps // max(self.sample_steps, 1)
        _check(p, self.method != "progressive" or (self.ode_steps % max(self.sample_steps, 1) == 0 and halvings >= 2
                                                   and halvings & (halvings - 1) == 0),
               f"distill.ode_steps={self.ode_steps} must be distill.sample_steps={self.sample_steps} times 2, 4, 8, … "
               "for progressive distillation (its levels halve down to sample_steps)")
        _check(p, self.method != "progressive" or self.steps >= max(halvings.bit_length() - 1, 1),
               f"distill.steps={self.steps} is fewer than progressive distillation's halvings; give each at least one")
        _check(p, self.teacher_order in (1, 2), f"distill.teacher_order must be 1 (DDIM) or 2 (DPM-Solver++(2S)), "
               f"got {self.teacher_order}")
        _check(p, self.method != "progressive" or self.teacher_order == 1,
               f"distill.teacher_order={self.teacher_order} with progressive distillation: its students are taught by "
               "DDIM steps, the steps they take themselves; leave it at 1 (or set distill.method=consistency)")
        _check(p, self.teacher_precision in TEACHER_PRECISIONS, f"distill.teacher_precision={self.teacher_precision!r} "
               f"is unknown; choose one of {', '.join(TEACHER_PRECISIONS)}")
        _check(p, 0 <= self.target_ema < 1, f"distill.target_ema must be in [0, 1), got {self.target_ema}")
        _check(p, 0 <= self.ema_decay < 1, f"distill.ema_decay must be in [0, 1), got {self.ema_decay}")
        _check(p, self.sample_steps >= 1, f"distill.sample_steps must be >= 1, got {self.sample_steps}")
        _check(p, not self.sample_levels_log_snr or len(self.sample_levels_log_snr) == self.sample_steps - 1,
               f"distill.sample_levels_log_snr={list(self.sample_levels_log_snr)} for distill.sample_steps="
               f"{self.sample_steps}: give sample_steps − 1 levels (the first is always T−1), or none")
        _check(p, self.method != "progressive" or not self.sample_levels_log_snr,
               f"distill.sample_levels_log_snr={list(self.sample_levels_log_snr)} with progressive distillation: its "
               "student learnt the levels even in log SNR only; leave it empty (or set distill.method=consistency)")
        _check(p, self.guidance >= 0, f"distill.guidance must be >= 0 (0 = the teacher's plain conditional steps), "
               f"got {self.guidance}")
        _check(p, self.log_every >= 1, f"distill.log_every must be >= 1, got {self.log_every}")
        _raise_if(p)


@dataclass(frozen=True)
class Config:
    name: str = "default"                                   # run/preset name, used in run names
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        spec = DATASETS[self.data.dataset]
        p: list[str] = []
        _check(p, self.model.in_channels == spec.channels,
               f"model.in_channels={self.model.in_channels} but {spec.name} images have {spec.channels} channel(s)")
        try:
            self.model.check_image_size(spec.image_size, spec.image_size)
        except ValueError as exc:
            p.append(f"model.channel_mults: {exc}")
        _check(p, self.model.num_classes in (None, spec.num_classes),
               f"model.num_classes={self.model.num_classes} but {spec.name} has {spec.num_classes} classes; "
               f"set {spec.num_classes} for a class-conditional model or leave it unset for an unconditional one")
        _check(p, (self.sample.steps or 0) <= self.diffusion.timesteps,
               f"sample.steps={self.sample.steps} exceeds diffusion.timesteps={self.diffusion.timesteps}")
        _check(p, all(n <= self.diffusion.timesteps for n in self.sample.nfe_sweep),
               f"sample.nfe_sweep={self.sample.nfe_sweep} exceeds diffusion.timesteps={self.diffusion.timesteps}")
        _check(p, self.sample.num_samples >= MIN_SCORED_IMAGES,
               f"sample.num_samples={self.sample.num_samples} is too few: the pipeline scores every sampler setting "
               "but the primary one on sample.num_samples images, and FID, KID and precision/recall need at least "
               f"{MIN_SCORED_IMAGES}; set sample.num_samples >= {MIN_SCORED_IMAGES} "
               "(`diffusion sample -n` takes any number)")
        levels_problem = _levels_problem(self.diffusion, self.sample)
        _check(p, not levels_problem, levels_problem)
        guided = self.unguidable((self.sample.guidance, *self.sample.guidance_sweep))
        _check(p, not guided,
               f"train.label_dropout=0 with guidance weights {guided} in sample.guidance / sample.guidance_sweep: a "
               "model that never saw the \"no class\" label cannot be guided; set train.label_dropout > 0 (0.1 is "
               "usual), or sample.guidance=0 and sample.guidance_sweep=[] (or weights of 0 only)")
        teacher_problem = self.guided_teacher_problem(self.distill.guidance)
        _check(p, not teacher_problem, teacher_problem)
        _raise_if(p)

    def unguidable(self, weights: typing.Iterable[float]) -> list[float]:
        """The guidance weights w > 0 among `weights` when this class-conditional model was trained without
        label dropout: it never learnt ε̂(x, ∅), the unconditional half of eq. 6 of Ho & Salimans (2022)."""
        if not self.conditional or self.train.label_dropout > 0:
            return []
        return [w for w in weights if w > 0]

    def guided_teacher_problem(self, guidance: float) -> str:
        """Why this model cannot teach its guided ODE at weight `guidance` (distill.guidance), or "" if it can."""
        if guidance == 0 or (self.conditional and not self.unguidable([guidance])):
            return ""
        return (f"distill.guidance={guidance} needs a class-conditional teacher trained with label dropout "
                "(train.label_dropout > 0: the unconditional half of the guided step); set distill.guidance=0")

    def check_sample(self, settings: SampleConfig) -> None:
        """Refuse, before any sampling, settings this model cannot sample with: a guidance weight it was not
        trained for (`unguidable`), or levels_log_snr that do not fit its schedule (`few_step_levels`)."""
        if self.unguidable([settings.guidance]):
            raise ConfigError(f"guidance {settings.guidance} refused: this model was trained with "
                              "train.label_dropout=0, so it never learnt the \"no class\" prediction guidance "
                              "subtracts; sample it with guidance 0, or train one with train.label_dropout > 0 "
                              "(0.1 is usual)")
        problem = _levels_problem(self.diffusion, settings)
        if problem:
            raise ConfigError(problem)

    @property
    def conditional(self) -> bool:
        """True for a class-conditional model (trained with label dropout, sampled with guidance)."""
        return self.model.num_classes is not None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def flat(self) -> dict[str, Any]:
        """{'train.lr': 0.001, …}: for MLflow params and overrides."""
        out = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                out[section] = values
        return out


def _levels_problem(diffusion: DiffusionConfig, settings: SampleConfig) -> str:
    """Why `settings`' levels_log_snr do not fit a model of `diffusion`'s schedule, or ""."""
    if not settings.levels_log_snr:
        return ""
    schedule = NoiseSchedule(diffusion.timesteps, diffusion.schedule)
    try:
        few_step_levels(schedule, len(settings.levels_log_snr) + 1, levels_log_snr=settings.levels_log_snr)
    except ValueError as exc:
        return (f"sample.levels_log_snr refused for this model's {diffusion.schedule} schedule of "
                f"{diffusion.timesteps} steps: {exc}")
    return ""


def _build(cls, values: dict[str, Any], where: str):
    """Instantiate a config dataclass from a dict, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a table of settings, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    retired = [f"{where}{k}" for k in unknown if f"{where}{k}" in RETIRED]
    if retired:
        raise ConfigError("; ".join(f"{key} is no longer a config setting: it belongs to {RETIRED[key]}" for key in retired))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(f'{where}{k}' for k in unknown)}; "
                          f"{where.rstrip('.') or 'config'} accepts {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, name) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-3' → ('train.lr', 0.001). Values are TOML literals; bare words are strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.field=value (e.g. train.steps=100)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set one setting; a table value ({"steps": 5} for "train") changes only the settings it names."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is a value, not a section")
    both_tables = isinstance(value, dict) and isinstance(node.get(leaf), dict)
    node[leaf] = _merge(node[leaf], value) if both_tables else value


def preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".toml", ".json") and path.is_file():
        return path
    candidate = PRESET_DIR / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    available = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
    raise ConfigError(f"unknown preset {name_or_path!r}; choose one of {', '.join(available)} or give a .toml (or resolved config.json) path")


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_preset(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset's settings; `extends = "other-preset"` starts from that preset's settings."""
    if path in seen:
        raise ConfigError(f"presets extend each other in a loop: {' → '.join(p.stem for p in (*seen, path))}")
    with open(path, "rb") as f:
        tree = _without_retired(json.load(f)) if path.suffix == ".json" else tomllib.load(f)
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise ConfigError(f"{path.name}: extends must be a preset name, got {parent!r}")
    return _merge(_read_preset(preset_path(parent), (*seen, path)), tree)


def load_config(
    preset: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    environ: dict[str, str] | None = None,
) -> Config:
    """Defaults ← preset file ← environment (ENV_OVERRIDES) ← overrides, validated once at the end."""
    tree: dict[str, Any] = {}
    if preset:
        path = preset_path(preset)
        tree = _read_preset(path)
        tree.setdefault("name", path.stem)
    environ = os.environ if environ is None else environ
    for var, dotted in ENV_OVERRIDES.items():
        if environ.get(var):
            _set_path(tree, dotted, environ[var])
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        _set_path(tree, key, value)
    return _build(Config, tree, "")


def _without_retired(record: dict[str, Any]) -> dict[str, Any]:
    """A stored resolved config (a record) without the settings that have since moved out (RETIRED)."""
    out = {**record}
    for dotted in RETIRED:
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def override_config(config: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """`config` with `section.field=value` overrides applied, validated again."""
    tree = config.to_dict()
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides]
    for key, value in items:
        _set_path(tree, key, value)
    return _build(Config, tree, "")


def config_from_dict(values: dict[str, Any]) -> Config:
    """A config from a resolved record (config.json of a run or model, a flow parameter)."""
    return _build(Config, _without_retired(values), "")
