"""Samplers: ancestral DDPM (Ho et al. 2020, Alg. 2), DDIM (Song et al. 2021, eq. 12), DPM-Solver++(2M)
in ODE and SDE form (Lu et al. 2022), each on a grid of `steps` timesteps (`sampling_timesteps`), and the
multistep sampler of a consistency model (Song et al. 2023, Alg. 1) and the DDIM sampler of a progressively
distilled model (Salimans & Ho 2022), the two few-step students of `distill`, on `few_step_levels`.

`model` is any callable (x_t [B,C,H,W], t LongTensor[B] in [0, T)) -> ε̂ with x_t's shape.
Randomness comes only from `generator`, drawn in a fixed order: x_T first (unless it is given), then one
standard-normal tensor of x's shape per step that adds noise. So a seed gives the same images, and a
test can redraw the exact noise a sampler used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
from tqdm.auto import tqdm

from .denoiser import eps_from_x0, predict_x0
from .guidance import check_class_labels, guided
from .runtime import tune_cpu_runtime
from .schedule import NoiseSchedule

if TYPE_CHECKING:
    from .config import SampleConfig

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Spacing = Literal["linear", "log_snr"]
SPACINGS = ("linear", "log_snr")
SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++2m-sde", "consistency", "progressive")
FEW_STEP_SAMPLERS = ("consistency", "progressive")  # the samplers of distilled students (few_step_levels)
DEFAULT_STEPS = 50  # network evaluations of every sampler but "ddpm" and the few-step ones when none are asked for
FEW_STEPS = 4  # network evaluations of a few-step sampler when none are asked for


def _initial_noise(shape, generator, device, dtype) -> torch.Tensor:
    """x_T ~ N(0, I), drawn on the generator's device (so a CPU seed gives the same x_T anywhere)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    return _initial_noise(x.shape, generator, x.device, x.dtype)


def _resolve_start(shape, x_T, generator, device, dtype) -> torch.Tensor:
    if x_T is not None:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)} was asked for")
        return x_T.to(device=device or x_T.device, dtype=dtype)
    return _initial_noise(shape, generator, device or "cpu", dtype)


class SelfConditioning:
    """A self-conditioning model (UNetConfig.self_condition) as an ε-model for one sampling run: each call also
    passes the model the x̂0 (clipped) of its call before, zeros at the first (Chen et al. 2022, Alg. 2). Under
    guidance the conditional and unconditional halves of a batch each read their own."""

    def __init__(self, model: EpsModel, schedule: NoiseSchedule) -> None:
        self.model, self.schedule, self.estimate = model, schedule, None
        self.net = getattr(model, "net", model)  # what num_classes_of reads

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        previous = self.estimate if self.estimate is not None and self.estimate.shape == x_t.shape else None
        eps = self.model(x_t, t, x0_estimate=previous, **cond)
        self.estimate = predict_x0(self.schedule, x_t, t, eps).clamp(-1.0, 1.0)
        return eps


def self_conditioning(model) -> bool:
    """Whether `model` (a Denoiser or its network) reads an estimate of x0 beside x_t."""
    config = getattr(getattr(model, "net", model), "config", None)  # a UNetConfig, or None for a plain callable
    return bool(getattr(config, "self_condition", False))


def default_steps(sampler: str, timesteps: int) -> int:
    """Network evaluations when none are asked for: all T for "ddpm" (Ho et al.'s chain), FEW_STEPS for a
    few-step student's sampler, DEFAULT_STEPS else."""
    if sampler in FEW_STEP_SAMPLERS:
        return FEW_STEPS
    return timesteps if sampler == "ddpm" else DEFAULT_STEPS


def default_spacing(sampler: str) -> str:
    """Timestep spacing when none is asked for: log-SNR for the DPM-Solver++ samplers (Lu et al. 2022 solve in
    λ, so even steps in λ are their natural grid) and the few-step samplers (their students are distilled on
    levels even in λ), linear in t for DDPM and DDIM (as Ho et al. and Song et al.)."""
    return "log_snr" if sampler.startswith("dpm++") or sampler in FEW_STEP_SAMPLERS else "linear"


def sampling_timesteps(schedule: NoiseSchedule, steps: int, spacing: Spacing = "linear") -> list[int]:
    """The `steps` distinct timesteps (descending, T−1 first, 0 last) a sampler visits; the step after the
    last one goes to ᾱ = 1 (clean data). One list serves both t and the next t, so they always agree.

    linear: evenly spaced in t.
    log_snr: evenly spaced in λ = log(ᾱ/(1−ᾱ)) (as DPM-Solver, Lu et al. 2022) over the schedule's usable
    range, from `schedule.usable_log_snr_min` (below it only the cosine schedule's β clip lowers λ, by ~7
    in one index) to λ at index 0; the first step is always T−1, where sampling starts.
    A target whose nearest index is taken moves to the next free index below it (near index 0, where
    there is no room below, the steps before it move up instead), so a collision shifts steps by one
    index where it happens and never moves one to the noisy top of the chain.
    """
    T = schedule.timesteps
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}] (the schedule's timesteps), got {steps!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if spacing == "linear":
        targets = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long()
    else:
        log_snr = schedule.log_snr
        wanted = torch.linspace(schedule.usable_log_snr_min, float(log_snr[0]), steps, dtype=torch.float64)
        targets = torch.argmin((log_snr[None, :] - wanted[:, None]).abs(), dim=1)  # nearest index per target
        targets[0] = T - 1
    grid: list[int] = []
    for k, target in enumerate(targets.tolist()):
        highest = grid[-1] - 1 if grid else T - 1  # strictly below the previous step
        lowest = steps - 1 - k  # leaves one index for each step still to come
        grid.append(min(max(target, lowest), highest))
    return grid


@torch.no_grad()
def ddim_sample(
    model: EpsModel,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = DEFAULT_STEPS,
    eta: float = 0.0,
    spacing: Spacing = "linear",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    x_T: torch.Tensor | None = None,
    clip_x0: bool = True,
    progress: bool = False,
    timesteps: list[int] | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) on the `steps` timesteps of `sampling_timesteps` (or on `timesteps`, a
    descending grid given whole), t → t':

    x_t' = √ᾱ_t' · x̂0 + √(1 − ᾱ_t' − σ²) · ε̂ + σ·z,
    σ = η · √((1 − ᾱ_t')/(1 − ᾱ_t)) · √(1 − ᾱ_t/ᾱ_t')  (eq. 16).
    η = 0 is deterministic; η = 1 is ancestral sampling (σ² = β̃ of the chain through the grid, see
    `ddpm_sample`). The final step goes to ᾱ_t' = 1, so the result is x̂0 with no noise added. If x̂0 is
    clipped, ε̂ is recomputed from the clipped x̂0 so the update stays consistent.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = ancestral like DDPM), got {eta!r}")
    timesteps = sampling_timesteps(schedule, steps, spacing) if timesteps is None else timesteps
    x = _resolve_start(shape, x_T, generator, device, dtype)
    alpha_bars = schedule.table("alpha_bars", x.device)
    nexts = timesteps[1:] + [-1]
    for i, i_next in tqdm(list(zip(timesteps, nexts)), desc=f"DDIM-{len(timesteps)}", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        eps = model(x, t)
        x0 = predict_x0(schedule, x, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = eps_from_x0(schedule, x, t, x0)
        ab = alpha_bars[i]
        ab_next = alpha_bars[i_next] if i_next >= 0 else torch.ones_like(ab)
        sigma = eta * ((1 - ab_next) / (1 - ab)).sqrt() * (1 - ab / ab_next).sqrt()
        direction = (1 - ab_next - sigma**2).clamp(min=0).sqrt()
        x = ab_next.sqrt().to(x.dtype) * x0 + direction.to(x.dtype) * eps
        if i_next >= 0 and eta > 0:
            x = x + sigma.to(x.dtype) * _noise_like(x, generator)
    return x.clamp(-1.0, 1.0) if clip_x0 else x


def ddpm_sample(model: EpsModel, schedule: NoiseSchedule, shape: tuple[int, ...], *, steps: int | None = None,
                spacing: Spacing = "linear", **kwargs) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2): x_t' ~ q(x_t' | x_t, x̂0) = N(μ̃, β̃) on the grid of
    `steps` timesteps (default all T; fewer is the respaced chain with β_t = 1 − ᾱ_t/ᾱ_t', Nichol & Dhariwal
    2021, §4). Its posterior mean and variance are exactly DDIM's update with η = 1 (Song et al. 2021,
    eq. 16), so this is `ddim_sample(eta=1)`; tests check it against Ho et al.'s eqs. 6–7.
    """
    return ddim_sample(model, schedule, shape, steps=steps or schedule.timesteps, eta=1.0, spacing=spacing,
                       **kwargs)


@torch.no_grad()
def dpm_solver_sample(
    model: EpsModel,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = DEFAULT_STEPS,
    spacing: Spacing = "log_snr",
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    x_T: torch.Tensor | None = None,
    clip_x0: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2): a 2nd-order multistep solver of the
    probability-flow ODE in data-prediction form, one network evaluation per step.

    With α = √ᾱ, σ = √(1−ᾱ), λ = log(α/σ) and h = λ_next − λ:
        x_next = (σ_next/σ)·x − α_next·(e^{−h} − 1)·D,
        D = (1 + 1/(2r))·x̂0 − 1/(2r)·x̂0_prev with r = h_prev/h  (2nd order), or D = x̂0 (1st order).
    `noise` η > 0: SDE-DPM-Solver++(2M) (same paper, §5 / App. B), which solves a reverse SDE instead,
    injecting fresh noise z each step like DDPM does:
        x_next = (σ_next/σ)·e^{−ηh}·x + α_next·(1 − e^{−(1+η)h})·D + σ_next·√(1 − e^{−2ηh})·z.
    η = 1 is Lu et al.'s SDE; η = 0 is the ODE above (no z is drawn); larger η re-noises more of x each step.
    It integrates dx = [f·x − ½(1+η)·g²·∇log p]dt + √η·g·dw̄ exactly over a step for constant D: for an exact
    denoiser every η ≥ 0 has the data's marginals (the reverse SDEs of one forward process; Karras et al. 2022,
    eq. 6), so η trades how much of the network's error each step forgets against how much noise the network
    must remove.
    A step is 1st order when it is the first; when r < 1/2, since D extrapolates x̂0 with weight 1/(2r)
    and a step more than twice as long as the one before would amplify x̂0's change (at 20 steps even in
    t the step into index 0 has r ≈ 0.23, weight ≈ 2.2: 2nd order there overshoots the spread by 29 %);
    and into index 0 when there are fewer than 15 steps (Lu et al. 2022's "lower order final").
    The final step goes to ᾱ = 1 (σ = 0), where the update is exactly x = x̂0.
    """
    timesteps = sampling_timesteps(schedule, steps, spacing)
    x = _resolve_start(shape, x_T, generator, device, dtype)
    alpha_bars = schedule.table("alpha_bars", x.device)
    half_log_snr = 0.5 * schedule.table("log_snr", x.device)  # λ = log(α/σ) = ½·log(ᾱ/(1−ᾱ))
    x0_prev, h_prev = None, None
    nexts = timesteps[1:] + [-1]
    for i, i_next in tqdm(list(zip(timesteps, nexts)), desc=f"DPM++2M-{steps}", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x0 = predict_x0(schedule, x, t, model(x, t))
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        if i_next < 0:
            x = x0
            break
        ab, ab_next = alpha_bars[i], alpha_bars[i_next]
        h = half_log_snr[i_next] - half_log_snr[i]
        r = None if h_prev is None else h_prev / h
        if r is None or r < 0.5 or (steps < 15 and i_next == 0):
            d = x0
        else:
            d = (1 + 1 / (2 * r)).to(x.dtype) * x0 - (1 / (2 * r)).to(x.dtype) * x0_prev
        ratio = ((1 - ab_next) / (1 - ab)).sqrt()
        x = ((ratio * torch.exp(-noise * h)).to(x.dtype) * x
             - (ab_next.sqrt() * torch.expm1(-(1 + noise) * h)).to(x.dtype) * d)
        if noise > 0:
            x = x + ((1 - ab_next) * -torch.expm1(-2 * noise * h)).sqrt().to(x.dtype) * _noise_like(x, generator)
        x0_prev, h_prev = x0, h
    return x.clamp(-1.0, 1.0) if clip_x0 else x


def few_step_levels(schedule: NoiseSchedule, steps: int, spacing: Spacing = "log_snr",
                    levels_log_snr: tuple[float, ...] = ()) -> list[int]:
    """The `steps` noise levels (descending timesteps, T−1 first) of a few-step sampler, the step after the last
    going to clean data: the first `steps` of `sampling_timesteps(steps + 1)`, whose last entry, index 0 (ᾱ ≈ 1),
    would spend an evaluation on almost nothing. Levels of `steps`·2^k are nested: every 2^k-th of them are the
    `steps` levels (even in λ, up to the nearest index), which progressive distillation relies on.

    With `levels_log_snr` (steps − 1 values, increasing: each level cleaner), the levels after T−1 are instead
    the timesteps whose λ = log(ᾱ/(1−ᾱ)) is nearest to each value; they must land on distinct timesteps below
    T−1."""
    if not isinstance(steps, int) or not 1 <= steps < schedule.timesteps:
        raise ValueError(f"steps must be an integer in [1, {schedule.timesteps - 1}] for a few-step sampler, "
                         f"got {steps!r}")
    if not levels_log_snr:
        return sampling_timesteps(schedule, steps + 1, spacing)[:-1]
    if len(levels_log_snr) != steps - 1:
        raise ValueError(f"{len(levels_log_snr)} levels_log_snr for {steps} steps: give steps − 1 = {steps - 1} "
                         "(the first level is always T−1)")
    log_snr = schedule.log_snr.double()
    wanted = torch.tensor(levels_log_snr, dtype=torch.float64)
    levels = [schedule.timesteps - 1] + torch.argmin((log_snr[None, :] - wanted[:, None]).abs(), dim=1).tolist()
    if any(later >= earlier for earlier, later in zip(levels, levels[1:])):
        raise ValueError(f"levels_log_snr {list(levels_log_snr)} give timesteps {levels}: each level must be "
                         f"cleaner than the one before, between log SNR {float(log_snr[-1]):.2f} (T−1) and "
                         f"{float(log_snr[0]):.2f} (t = 0), and land on its own timestep")
    return levels


@torch.no_grad()
def consistency_sample(
    model: EpsModel,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = FEW_STEPS,
    spacing: Spacing = "log_snr",
    levels_log_snr: tuple[float, ...] = (),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    x_T: torch.Tensor | None = None,
    clip_x0: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) at the levels t_1 > … > t_n of
    `few_step_levels` (`spacing`, or `levels_log_snr`): x̂0 = f(x_T, t_1), then for each later level
        x_t = √ᾱ_t · x̂0 + √(1 − ᾱ_t) · z,   x̂0 = f(x_t, t),
    one network evaluation per level. f(x, t) is the model's x̂0 (`predict_x0` of its ε̂), which for a
    consistency model is the end of the probability-flow ODE through (x, t): a sample, not a mean. The
    fresh noise at each level is what lets a later evaluation correct an earlier one. (Used on an ordinary
    ε-model, whose x̂0 is the posterior mean, this gives blurred images.)
    """
    levels = few_step_levels(schedule, steps, spacing, levels_log_snr)
    x = _resolve_start(shape, x_T, generator, device, dtype)
    alpha_bars = schedule.table("alpha_bars", x.device)
    x0 = x
    for k, i in enumerate(tqdm(levels, desc=f"consistency-{steps}", disable=not progress, leave=False)):
        if k > 0:
            ab = alpha_bars[i]
            x = ab.sqrt().to(x.dtype) * x0 + (1 - ab).sqrt().to(x.dtype) * _noise_like(x, generator)
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x0 = predict_x0(schedule, x, t, model(x, t))
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
    return x0


def sample(model: EpsModel, schedule: NoiseSchedule, shape: tuple[int, ...], *, sampler: str = "ddim",
           steps: int | None = None, eta: float = 0.0, sde_noise: float = 1.0, spacing: Spacing | None = None,
           levels_log_snr: tuple[float, ...] = (), class_labels: torch.Tensor | None = None, guidance: float = 0.0,
           **kwargs) -> torch.Tensor:
    """Dispatch by sampler name: "ddpm" (ancestral), "ddim" (with `eta`), "dpm++2m" or its stochastic
    variant "dpm++2m-sde" (with noise `sde_noise`), "consistency" (a consistency-distilled student) or
    "progressive" (a progressively distilled one: deterministic DDIM on `few_step_levels`). `steps` and
    `spacing` left as None take `default_steps` and `default_spacing`; `levels_log_snr` places the consistency
    sampler's levels (few_step_levels) and is refused by the others. A self-conditioning model
    (UNetConfig.self_condition) is sampled through `SelfConditioning`, fresh for each call.
    With `class_labels` [B] (a class-conditional model), every sampler runs on the classifier-free-guided
    ε̂ with weight `guidance` (see diffusion_core.guidance)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if self_conditioning(model):
        model = SelfConditioning(model, schedule)  # fresh for each run: no estimate carries over
    if class_labels is None:
        check_class_labels(model, None, guidance)  # guidance without labels is an error
    else:
        if len(class_labels) != shape[0]:
            raise ValueError(f"{len(class_labels)} class labels for {shape[0]} images")
        model = guided(model, class_labels, guidance)  # checks the labels against the model
    if levels_log_snr and sampler != "consistency":
        raise ValueError(f"levels_log_snr is a setting of the consistency sampler, not of {sampler!r}")
    grid = dict(steps=steps or default_steps(sampler, schedule.timesteps), spacing=spacing or default_spacing(sampler))
    if sampler == "ddpm":
        return ddpm_sample(model, schedule, shape, **grid, **kwargs)
    if sampler == "ddim":
        return ddim_sample(model, schedule, shape, eta=eta, **grid, **kwargs)
    if sampler == "consistency":
        return consistency_sample(model, schedule, shape, levels_log_snr=levels_log_snr, **grid, **kwargs)
    if sampler == "progressive":
        return ddim_sample(model, schedule, shape, timesteps=few_step_levels(schedule, grid["steps"], grid["spacing"]),
                           **kwargs)
    noise = sde_noise if sampler == "dpm++2m-sde" else 0.0
    return dpm_solver_sample(model, schedule, shape, noise=noise, **grid, **kwargs)


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """The CPU generator of batch number `batch` of a sampling run with seed `seed`: every batch has its own stream,
    so a batch's images do not depend on the batches before it or on how many follow."""
    return torch.Generator().manual_seed(seed * 1_000_003 + batch)


def generate_batches(model: EpsModel, schedule: NoiseSchedule, image_shape: tuple[int, ...], settings: SampleConfig,
                     *, device: torch.device | str, progress: bool = True, class_labels: torch.Tensor | None = None,
                     first_batch: int = 0):
    """Yield uint8 image batches [b, C, H, W] on the CPU until `settings.num_samples` are made, drawn with
    `settings` (sampler, steps, eta, sde_noise, spacing, clip_x0, guidance; batch_size images per call).

    Batch k is seeded by (settings.seed, k), so memory stays bounded by one batch whatever N is, and the
    first images of a longer run equal those of a shorter one. `class_labels` [num_samples] (for a
    conditional model) are sliced per batch. `first_batch` numbers the batches from there: batches
    first_batch, first_batch + 1, … of a longer run (one shard of it, drawn on its own).
    """
    from .images import to_uint8

    num_samples, batch_size = settings.num_samples, settings.batch_size
    if class_labels is not None and len(class_labels) != num_samples:
        raise ValueError(f"{len(class_labels)} class labels for {num_samples} samples")
    check_class_labels(model, class_labels, settings.guidance)
    tune_cpu_runtime()
    made = 0
    bar = tqdm(total=num_samples, desc="sampling", unit="img", disable=not progress)
    for k in range(first_batch, first_batch + (num_samples + batch_size - 1) // batch_size):
        b = min(batch_size, num_samples - made)
        generator = batch_generator(settings.seed, k)
        labels = None if class_labels is None else class_labels[made:made + b]
        x = sample(model, schedule, (b, *image_shape), sampler=settings.sampler, steps=settings.steps,
                   eta=settings.eta, sde_noise=settings.sde_noise, spacing=settings.spacing,
                   levels_log_snr=settings.levels_log_snr,
                   clip_x0=settings.clip_x0, class_labels=labels,
                   guidance=settings.guidance, generator=generator, device=device)
        made += b
        bar.update(b)
        yield to_uint8(x).cpu()
    bar.close()
