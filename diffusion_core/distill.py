"""Few-step students of a trained model (the teacher), by one of two distillations (distill.method).

Consistency distillation (Song et al. 2023, "Consistency Models", Alg. 2): a student f(x_t, t) that maps any
point of the teacher's probability-flow ODE to the ODE's end, so that a handful of network evaluations draw
an image (`samplers.consistency_sample`). One step, for clean images x0, noise z and a noise level t drawn
even in log-SNR (a share distill.level_focus of them at the sampler's own levels; `student_level_probabilities`):
    x_t   = √ᾱ_t·x0 + √(1−ᾱ_t)·z                        (the forward process)
    x_t'  = one ODE step of the teacher from t to t', the level Δλ cleaner (`cleaner_level`): DDIM (η = 0),
            or second order with one more teacher evaluation (distill.teacher_order; `teacher_ode_step`)
    loss  = d(f_θ(x_t, t), f_θ⁻(x_t', t'))             with f(x, −1) = x (t' = −1: clean data, ᾱ = 1)
θ⁻ is a slow EMA of θ (distill.target_ema) that no gradient reaches; d is the weighted squared x̂0 error or its
pseudo-Huber distance (distill.loss_weighting, distill.loss_metric; `weighted_x0_error`). Δλ is
1/distill.ode_steps of the schedule's usable log-SNR range. When the teacher is exact, the exact consistency
function makes every loss term 0 (tests check it on data that the DDIM step follows exactly).

Progressive distillation (Salimans & Ho 2022, Alg. 2): a student whose ONE deterministic DDIM step does what
TWO of its teacher's do, halving the levels stage by stage (`halving_stages`) from distill.ode_steps down to
distill.sample_steps, each stage's student teaching the next (its EMA becomes the teacher); the last is
sampled by DDIM on its levels (the "progressive" sampler). One step draws a level t of the student's
(`samplers.few_step_levels`) and regresses its x̂0 on `two_step_target`.

With distill.guidance = w > 0 a class-conditional teacher takes its steps with classifier-free guidance
(`GuidedTeacher`; Meng et al. 2023), so the student learns the guided ODE and samples it without guidance.

The student is the teacher's network, initialised with its weights. By default it predicts
v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022), so that its x̂0 = √ᾱ·x_t − √(1−ᾱ)·v stays well-conditioned at the
top of the chain, where an ε-prediction divides by √ᾱ_T ≈ 0.006 (distill.prediction). Predicting ε, it
starts as exactly the teacher's x̂0 instead; the weight min(SNR_t, 1) on the loss (distill.loss_weighting)
then keeps its gradient bounded. It is exported as an ordinary model whose config samples with its method's
sampler at distill.sample_steps evaluations, so `diffusion sample`, `diffusion evaluate` and the served model
use it like any other; its config.json names the teacher.

Run folder layout (`run_dir`): metrics.jsonl (one JSON line per report), model/ (the student's EMA
weights), loss_curve.png.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import build_denoiser, export_model, load_model
from .config import Config, ConfigError, DistillConfig, override_config
from .data import prepare_dataset
from .denoiser import Denoiser, eps_from_x0, predict_x0
from .ema import EMA
from .forward import q_sample
from .guidance import drop_labels, guided_eps
from .images import to_model_space
from .samplers import few_step_levels
from .runtime import fast_bf16_cpu, tune_cpu_runtime
from .schedule import NoiseSchedule
from .train import GlobalBatches, learning_rate, plot_loss_curve


@dataclass
class DistillResult:
    run_dir: Path
    steps: int
    final_loss: float
    images_per_s: float
    teacher_precision: str  # "fp32" or "bf16": distill.teacher_precision as resolved on this machine


def student_config(teacher: Config, overrides: list[str] | dict | None = None) -> Config:
    """The student's config: the teacher's, with `overrides` (distill.*, sample.* …), predicting
    distill.prediction and sampled by the consistency sampler at distill.sample_steps evaluations; a student of
    the guided teacher (distill.guidance > 0) has its guidance in its weights, and samples and sweeps none."""
    config = override_config(teacher, overrides or [])
    problem = teacher.guided_teacher_problem(config.distill.guidance)  # the teacher's own training, not the overrides'
    if problem:
        raise ConfigError(f"{problem} (the teacher was trained with model.num_classes={teacher.model.num_classes}, "
                          f"train.label_dropout={teacher.train.label_dropout})")
    guided = {"sample.guidance": 0.0, "sample.guidance_sweep": []} if config.distill.guidance else {}
    return override_config(config, {**guided, "diffusion.prediction": config.distill.prediction,
                                    "sample.sampler": config.distill.method,
                                    "sample.steps": config.distill.sample_steps,
                                    "sample.spacing": "log_snr",
                                    "sample.levels_log_snr": list(config.distill.sample_levels_log_snr),
                                    "name": f"{teacher.name}-{config.distill.method}"})


def alpha_bar_or_one(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t broadcast to `like`, with ᾱ = 1 (clean data) where t = −1."""
    alpha_bar = schedule.gather("alpha_bars", t.clamp(min=0), like)
    return torch.where((t < 0).view(-1, *([1] * (like.dim() - 1))), torch.ones_like(alpha_bar), alpha_bar)


def cleaner_level(schedule: NoiseSchedule, t: torch.Tensor, step_log_snr: float) -> torch.Tensor:
    """t': the noisiest timestep whose log-SNR is at least λ_t + Δλ (always < t), or −1 (clean data) where
    none is. λ falls with t, so t' is the count of timesteps with λ ≥ λ_t + Δλ, minus one."""
    log_snr = schedule.table("log_snr", t.device)
    wanted = log_snr[t] + step_log_snr
    return (log_snr[None, :] >= wanted[:, None]).sum(dim=1) - 1


def ode_step_log_snr(schedule: NoiseSchedule, ode_steps: int) -> float:
    """Δλ of one teacher step: 1/`ode_steps` (distill.ode_steps) of the schedule's usable log-SNR range."""
    return (float(schedule.log_snr[0]) - schedule.usable_log_snr_min) / ode_steps


def teacher_chain(schedule: NoiseSchedule, ode_steps: int) -> list[int]:
    """The levels of the teacher's steps from t = T−1 down to clean data (−1), each `cleaner_level` than the last:
    the chain a consistency student learns to jump along from the top."""
    step_log_snr, levels = ode_step_log_snr(schedule, ode_steps), [schedule.timesteps - 1]
    while levels[-1] >= 0:
        levels.append(int(cleaner_level(schedule, torch.tensor([levels[-1]]), step_log_snr)))
    return levels


def level_probabilities(schedule: NoiseSchedule) -> torch.Tensor:
    """p(t) ∝ the log-SNR span of timestep t (half the gap to each neighbour): t drawn from it is even in λ
    over the whole chain, as the student is sampled."""
    log_snr = schedule.log_snr.double()
    edges = torch.cat([log_snr[:1], 0.5 * (log_snr[1:] + log_snr[:-1]), log_snr[-1:]])
    return (edges[:-1] - edges[1:]).clamp(min=0)


def student_level_probabilities(schedule: NoiseSchedule, cfg: DistillConfig) -> torch.Tensor:
    """Weights of p(t) for a consistency student's noise levels (`torch.multinomial` normalises them): the share
    1 − distill.level_focus even in λ (`level_probabilities`), and distill.level_focus split equally among the levels
    its own sampler evaluates it at (T−1 and distill.sample_levels_log_snr: `few_step_levels` at distill.sample_steps).
    At level_focus 0 they are `level_probabilities` itself, so that runs without it draw the levels they always drew."""
    even = level_probabilities(schedule)
    if cfg.level_focus == 0:
        return even
    levels = torch.tensor(few_step_levels(schedule, cfg.sample_steps, levels_log_snr=cfg.sample_levels_log_snr))
    share = torch.full(levels.shape, cfg.level_focus / len(levels), dtype=even.dtype)
    return ((1 - cfg.level_focus) * (even / even.sum())).index_add_(0, levels, share)


class Bf16Passes:
    """A network whose passes run under bfloat16 autocast and return float32 (distill.teacher_precision): for the
    teacher's and the target network's passes, which need no gradient; the ODE steps and losses built on their outputs
    stay in float32. What `teacher_ode_step`, `GuidedTeacher` and `consistency_function` call in the network's place."""

    def __init__(self, model: Denoiser) -> None:
        self.model, self.net, self.schedule = model, model.net, model.schedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16):
            return self.model(x_t, t, **cond).float()


def teacher_passes_in_bf16(precision: str, device: torch.device) -> bool:
    """distill.teacher_precision resolved on `device`: "auto" is bf16 on CPUs that compute bf16 natively (AMX or
    AVX512-BF16: `fast_bf16_cpu`), fp32 elsewhere."""
    return precision == "bf16" or (precision == "auto" and device.type == "cpu" and fast_bf16_cpu())


class GuidedTeacher:
    """The teacher as its classifier-free-guided ε̂ with weight w (distill.guidance): what `teacher_ode_step` and
    `two_step_target` call in its place, so that the student learns the guided probability-flow ODE in its few
    steps (Meng et al. 2023, "On distillation of guided diffusion models", §3.1, with w fixed)."""

    def __init__(self, teacher: Denoiser, guidance: float) -> None:
        self.teacher, self.guidance, self.schedule = teacher, guidance, teacher.schedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return guided_eps(self.teacher, x_t, t, class_labels, self.guidance)


def teacher_for(denoiser: Denoiser, cfg: DistillConfig,
                device: torch.device) -> Denoiser | Bf16Passes | GuidedTeacher:
    """The teacher as distillation calls it: without gradients, its passes in distill.teacher_precision on `device`
    (`teacher_passes_in_bf16`), guided at distill.guidance (`GuidedTeacher`) when that is > 0."""
    teacher = denoiser.requires_grad_(False).eval()
    teacher = Bf16Passes(teacher) if teacher_passes_in_bf16(cfg.teacher_precision, device) else teacher
    return GuidedTeacher(teacher, cfg.guidance) if cfg.guidance > 0 else teacher


def ddim_step_with(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                   x0: torch.Tensor) -> torch.Tensor:
    """The DDIM step (η = 0; Song et al. 2021, eq. 12) from t to t_next that x̂0 = `x0` makes (per image; −1 = clean):
    x_t' = √ᾱ_t'·x0 + √(1−ᾱ_t')·ε̂, with ε̂ = (x_t − √ᾱ_t·x0)/√(1−ᾱ_t) the noise that x0 implies."""
    alpha_bar_next = alpha_bar_or_one(schedule, t_next, x_t)
    return alpha_bar_next.sqrt() * x0 + (1 - alpha_bar_next).sqrt() * eps_from_x0(schedule, x_t, t, x0)


def teacher_x0(teacher: Denoiser | GuidedTeacher, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """The teacher's x̂0 at t, clipped to [−1, 1] as the samplers clip it."""
    return predict_x0(teacher.schedule, x_t, t, teacher(x_t, t, **cond)).clamp(-1.0, 1.0)


def midway_level(schedule: NoiseSchedule, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """The timestep nearest halfway in log-SNR from t to t_next (both ≥ 0), strictly cleaner than t and no cleaner
    than t_next, so that the step's first part is never empty."""
    log_snr = schedule.table("log_snr", t.device)
    wanted = 0.5 * (log_snr[t] + log_snr[t_next])
    nearest = (log_snr[None, :] - wanted[:, None]).abs().argmin(dim=1)
    return torch.minimum(torch.maximum(nearest, t_next), t - 1)


def teacher_ode_step(teacher: Denoiser | GuidedTeacher, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                     order: int = 1, **cond) -> torch.Tensor:
    """One step of the teacher's probability-flow ODE from t to t_next (per image; −1 = clean, where the step
    returns x̂0), in data prediction with the exponential integrator (Lu et al. 2022b, "DPM-Solver++"):
    x_t' = (σ'/σ)·x_t + α'·(1 − e^(−h))·D, h = λ' − λ, λ = log(α/σ), which is `ddim_step_with` x̂0 = D.
    order 1: D = x̂0(x_t, t), DDIM with η = 0 (Song et al. 2021, eq. 12).
    order 2: DPM-Solver++(2S): one more teacher evaluation at s, the timestep halfway in λ (`midway_level`), at the
    point u the first-order step reaches there; with r = (λ_s − λ)/h,
        D = (1 − 1/(2r))·x̂0(x_t, t) + (1/(2r))·x̂0(u, s),
    whose local error is O(h³) against DDIM's O(h²). Steps to clean data stay first order (h is infinite there).
    x̂0 is clipped to [−1, 1], as the samplers clip it."""
    if order not in (1, 2):
        raise ValueError(f"teacher_ode_step: order must be 1 (DDIM) or 2 (DPM-Solver++(2S)), got {order}")
    schedule = teacher.schedule
    x0 = teacher_x0(teacher, x_t, t, **cond)
    if order == 2:
        inner = (t_next >= 0).nonzero().squeeze(1)  # steps to clean data stay first order
        if len(inner):
            x_in, t_in, next_in, x0_in = x_t[inner], t[inner], t_next[inner], x0[inner]
            mid = midway_level(schedule, t_in, next_in)
            x0_mid = teacher_x0(teacher, ddim_step_with(schedule, x_in, t_in, mid, x0_in), mid,
                                **{name: value[inner] for name, value in cond.items()})
            log_snr = schedule.table("log_snr", t.device)
            r = (log_snr[mid] - log_snr[t_in]) / (log_snr[next_in] - log_snr[t_in])
            weight_mid = (0.5 / r).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
            x0 = x0.index_copy(0, inner, (1 - weight_mid) * x0_in + weight_mid * x0_mid)
    return ddim_step_with(schedule, x_t, t, t_next, x0)


def consistency_function(model: Denoiser, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """f(x, t) = the model's x̂0 at t, and x itself where t = −1 (the boundary condition f(x, clean) = x)."""
    x0 = predict_x0(model.schedule, x, t.clamp(min=0), model(x, t.clamp(min=0), **cond))
    return torch.where((t < 0).view(-1, *([1] * (x.dim() - 1))), x, x0)


PSEUDO_HUBER_C = 0.00054  # pseudo-Huber c per pixel (Song & Dhariwal 2023, §3.3: 0.00054·√D over D pixels)


def weighted_x0_error(prediction: torch.Tensor, goal: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor,
                      weighting: str = "none", metric: str = "l2") -> torch.Tensor:
    """The distillation losses' distance, averaged over images: per image e² = w(t)·‖x̂0 − goal‖² (the mean over
    pixels) with w = 1 ("none"), min(SNR_t, 1) ("min_snr") or max(SNR_t, 1) ("truncated_snr", Salimans & Ho 2022,
    eq. 10); then e² itself ("l2") or √(e² + c²) − c ("pseudo_huber", c = `PSEUDO_HUBER_C`; Song & Dhariwal 2023,
    eq. 6 divided by √D), quadratic below c and |e| above, so that no image's gradient grows with its error."""
    per_image = ((prediction.float() - goal.float()) ** 2).flatten(1).mean(1)
    if weighting != "none":
        snr = schedule.table("log_snr", t.device)[t].exp()
        per_image = per_image * (snr.clamp(max=1.0) if weighting == "min_snr" else snr.clamp(min=1.0)).float()
    if metric == "pseudo_huber":
        per_image = (per_image + PSEUDO_HUBER_C**2).sqrt() - PSEUDO_HUBER_C
    return per_image.mean()


def consistency_distillation_loss(student: Denoiser, target: Denoiser, teacher: Denoiser | GuidedTeacher,
                                  x0: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, noise: torch.Tensor,
                                  weighting: str = "none", teacher_order: int = 1, metric: str = "l2",
                                  **cond) -> torch.Tensor:
    """w(t)·‖f_θ(x_t, t) − f_θ⁻(x̂_t', t')‖² (`weighted_x0_error` in `metric`), where x̂_t' is the teacher's ODE step
    of `teacher_order`. Gradients reach the student only."""
    x_t = q_sample(student.schedule, x0, t, noise)
    with torch.no_grad():
        x_next = teacher_ode_step(teacher, x_t, t, t_next, teacher_order, **cond)
        goal = consistency_function(target, x_next, t_next, **cond).clamp(-1.0, 1.0)
    return weighted_x0_error(consistency_function(student, x_t, t, **cond), goal, student.schedule, t, weighting,
                             metric)


def two_step_target(teacher: Denoiser | GuidedTeacher, x_t: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor,
                    t_next: torch.Tensor, **cond) -> torch.Tensor:
    """x̃ of progressive distillation (Salimans & Ho 2022, Alg. 2): the x̂0 with which ONE DDIM step (η = 0) from
    t lands exactly where TWO of the teacher's land, t → t_mid → t_next (per image; t_next = −1 is clean data):
        x_t'' = the teacher's two steps,   x̃ = (x_t'' − (σ''/σ)·x_t) / (α'' − (σ''/σ)·α),
    α = √ᾱ, σ = √(1−ᾱ) at t, '' at t_next (α'' = 1, σ'' = 0 at clean data, where x̃ = x_t'')."""
    x_next = teacher_ode_step(teacher, teacher_ode_step(teacher, x_t, t, t_mid, **cond), t_mid, t_next, **cond)
    alpha_bar = alpha_bar_or_one(teacher.schedule, t, x_t)
    alpha_bar_next = alpha_bar_or_one(teacher.schedule, t_next, x_t)
    ratio = ((1 - alpha_bar_next) / (1 - alpha_bar)).sqrt()
    return (x_next - ratio * x_t) / (alpha_bar_next.sqrt() - ratio * alpha_bar.sqrt())


def progressive_distillation_loss(student: Denoiser, teacher: Denoiser | GuidedTeacher, x0: torch.Tensor,
                                  t: torch.Tensor, t_mid: torch.Tensor, t_next: torch.Tensor, noise: torch.Tensor,
                                  weighting: str = "none", metric: str = "l2", **cond) -> torch.Tensor:
    """w(t)·‖x̂0_θ(x_t, t) − x̃‖² (`weighted_x0_error` in `metric`, x̃ from `two_step_target`). Gradients reach the
    student only."""
    schedule = student.schedule
    x_t = q_sample(schedule, x0, t, noise)
    with torch.no_grad():
        goal = two_step_target(teacher, x_t, t, t_mid, t_next, **cond)
    return weighted_x0_error(predict_x0(schedule, x_t, t, student(x_t, t, **cond)), goal, schedule, t, weighting,
                             metric)


def halving_stages(schedule: NoiseSchedule, cfg: DistillConfig) -> list[Stage]:
    """Progressive distillation's stages: the student's levels halve from distill.ode_steps to distill.sample_steps
    (each `few_step_levels`), a stage's teacher having twice its student's levels; distill.steps are split evenly
    (the remainder to the last, which makes the exported student). Its teacher's level between each two of the
    student's must lie strictly between them, else the schedule has too few timesteps for these levels."""
    stages, levels = [], cfg.ode_steps // 2
    count = cfg.ode_steps.bit_length() - cfg.sample_steps.bit_length()
    while levels >= cfg.sample_steps:
        student, teacher = few_step_levels(schedule, levels), few_step_levels(schedule, 2 * levels)
        nexts = student[1:] + [-1]
        if not all(a > m > b for a, m, b in zip(student, teacher[1::2], nexts)):
            raise ConfigError(f"distill.ode_steps={cfg.ode_steps} levels do not fit between the schedule's "
                              f"{schedule.timesteps} timesteps; use fewer (a power of two times distill.sample_steps)")
        steps = cfg.steps // count + (cfg.steps % count if levels == cfg.sample_steps else 0)
        stages.append(Stage(torch.tensor(student), torch.tensor(teacher[1::2]), torch.tensor(nexts), steps))
        levels //= 2
    return stages


@dataclass
class Stage:
    """One halving: the student's levels, the teacher's level after each and the student's next level (−1 =
    clean), as tensors indexed by the interval drawn; and its optimizer steps."""

    levels: torch.Tensor
    mid_levels: torch.Tensor
    next_levels: torch.Tensor
    steps: int


def distill(teacher_path: str | Path, run_dir: str | Path, overrides: list[str] | dict | None = None, *,
            device: torch.device | str = "cpu", progress: bool = True) -> DistillResult:
    """Distil the model at `teacher_path` (an exported model or run folder) into a few-step student in
    `run_dir`/model by distill.method (consistency or progressive), with the teacher's config plus `overrides`
    (distill.* settings). One process."""
    run_dir = Path(run_dir)
    if (run_dir / "model").exists():
        raise ConfigError(f"{run_dir} already holds a distilled model ({run_dir / 'model'}); distil into a new "
                          "--run-dir, or delete that folder to replace it")
    device = torch.device(device)
    loaded = load_model(teacher_path, device)
    if loaded.config.model.self_condition:
        raise ConfigError("the teacher reads its own estimate of x0 (model.self_condition = true), which distillation "
                          "does not hand it nor teaches the student to read; distil a model trained without "
                          "self-conditioning")
    config = student_config(loaded.config, overrides)
    cfg = config.distill
    bf16 = teacher_passes_in_bf16(cfg.teacher_precision, device)
    precision = "bf16" if bf16 else "fp32"  # as resolved here: recorded with the student, shown beside the progress
    passes = Bf16Passes if bf16 else (lambda model: model)  # how the passes without gradients run
    teacher = teacher_for(loaded.denoiser, cfg, device)  # a progressive run's later stages: its own guided students
    schedule = teacher.schedule
    stages = halving_stages(schedule, cfg) if cfg.method == "progressive" else []  # refused before any work
    tune_cpu_runtime()
    dataset = prepare_dataset(config.data.dataset, config.data.source, config.data.data_dir)
    images_u8, labels = dataset.load("train")
    batches = GlobalBatches(images_u8.shape[0], cfg.batch_size, cfg.seed)

    torch.manual_seed(cfg.seed)
    student = build_denoiser(config).to(device)
    student.net.load_state_dict(loaded.denoiser.net.state_dict())  # the teacher's features; a v head learns v
    target = copy.deepcopy(student).requires_grad_(False).eval()  # consistency: θ⁻
    target_passes = passes(target)
    ema = EMA(student.net, cfg.ema_decay)
    optimizer = torch.optim.Adam(student.net.parameters(), lr=cfg.lr)
    rng = torch.Generator().manual_seed(cfg.seed + 1)
    step_log_snr = ode_step_log_snr(schedule, cfg.ode_steps)
    probabilities = student_level_probabilities(schedule, cfg)
    stage_ends = list(itertools.accumulate(stage.steps for stage in stages))
    null_label = config.model.num_classes

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = run_dir / "metrics.jsonl"
    metrics_file.unlink(missing_ok=True)
    loss_sum, reported, last_time = torch.zeros((), device=device), 0, time.perf_counter()
    result_loss, result_ips = float("nan"), 0.0
    student.train()
    for step in tqdm(range(cfg.steps), desc=f"distill (teacher passes {precision})", disable=not progress,
                     dynamic_ncols=True):
        if step in stage_ends:  # progressive: the next halving is taught by this one's student (its EMA)
            stage_teacher = Denoiser(copy.deepcopy(ema.model), schedule, student.prediction)
            teacher = passes(stage_teacher.requires_grad_(False).eval())
            ema = EMA(student.net, cfg.ema_decay)
        index = batches.indices(step)
        x0 = to_model_space(images_u8[index]).to(device)
        cond = {}
        if config.conditional:  # the teacher's label dropout, so the student keeps the unconditional mode
            cond["class_labels"] = drop_labels(labels[index], config.train.label_dropout, null_label, rng).to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_decay)
        if stages:
            stage = stages[bisect.bisect_right(stage_ends, step)]
            interval = torch.randint(0, len(stage.levels), (cfg.batch_size,), generator=rng)
            noise = torch.randn(x0.shape, generator=rng)
            loss = progressive_distillation_loss(
                student, teacher, x0, stage.levels[interval].to(device), stage.mid_levels[interval].to(device),
                stage.next_levels[interval].to(device), noise.to(device), cfg.loss_weighting, cfg.loss_metric,
                **cond)
        else:
            t = torch.multinomial(probabilities, cfg.batch_size, replacement=True, generator=rng)
            t_next = cleaner_level(schedule, t, step_log_snr)
            noise = torch.randn(x0.shape, generator=rng)
            loss = consistency_distillation_loss(student, target_passes, teacher, x0, t.to(device), t_next.to(device),
                                                 noise.to(device), cfg.loss_weighting, cfg.teacher_order,
                                                 cfg.loss_metric, **cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.net.parameters(), cfg.grad_clip)
        optimizer.step()
        if not stages:
            with torch.no_grad():
                torch._foreach_lerp_(list(target.net.parameters()), list(student.net.parameters()), 1 - cfg.target_ema)
        ema.update(student.net)
        loss_sum += loss.detach()  # read back once per report, not every step
        reported += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.perf_counter()
            result_loss, result_ips = float(loss_sum) / reported, reported * cfg.batch_size / (now - last_time)
            with open(metrics_file, "a") as f:
                f.write(json.dumps({"step": done, "loss": result_loss, "lr": optimizer.param_groups[0]["lr"],
                                    "images_per_s": result_ips}) + "\n")
            loss_sum, reported, last_time = torch.zeros((), device=device), 0, now

    teacher_info = {"path": str(teacher_path), "name": loaded.config.name, **loaded.info}
    export_model(run_dir / "model", ema.model, config,
                 {"teacher": teacher_info, "distill_steps": cfg.steps, "dataset_sha256": dataset.sha256,
                  "images_seen": cfg.steps * cfg.batch_size,
                  "teacher_precision": precision})
    plot_loss_curve(metrics_file, run_dir / "loss_curve.png")
    return DistillResult(run_dir, cfg.steps, result_loss, result_ips, precision)
