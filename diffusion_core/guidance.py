"""Classifier-free guidance (Ho & Salimans 2022): one network that is both class-conditional and
unconditional, and the guided ε̂ that trades diversity for class fidelity.

Training side: each label is replaced by the "no class" token with probability p (label dropout),
so the network also learns ε̂(x_t, ∅). The token is the index `num_classes` of the U-Net's class
embedding.

Sampling side (eq. 6 of the paper, with w the guidance weight):
    ε̃(x_t, c) = (1 + w)·ε̂(x_t, c) − w·ε̂(x_t, ∅)
w = 0 is plain conditional sampling; w > 0 moves samples towards what the class explains better than
the mixture does. The conditional and unconditional passes run as one batched forward pass, and the
result is an ordinary ε-model, so every sampler takes it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def num_classes_of(model) -> int | None:
    """The class count of a Denoiser or U-Net (None for an unconditional one or an unknown callable)."""
    net = getattr(model, "net", model)
    config = getattr(net, "config", None)
    return getattr(config, "num_classes", None)


def drop_labels(labels: torch.Tensor, probability: float, null_label: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Labels with each one replaced by `null_label` with chance `probability` (drawn from `generator`)."""
    if probability <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def check_class_labels(model, class_labels: torch.Tensor | None, guidance: float) -> None:
    """Fail before any sampling when a request does not fit the model."""
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0 (0 = plain conditional sampling), got {guidance}")
    num_classes = num_classes_of(model)
    if class_labels is None:
        if guidance != 0:
            raise ValueError("guidance needs class labels: say which class(es) to draw")
        return
    if num_classes is None:
        raise ValueError("this model is unconditional (trained without classes), so it cannot be asked for a class; "
                         "drop the class/guidance request, or train a conditional model with model.num_classes set")
    if class_labels.dtype not in (torch.int32, torch.int64) or class_labels.ndim != 1:
        raise ValueError(f"class labels must be a 1-D integer tensor, got {class_labels.dtype} {tuple(class_labels.shape)}")
    if len(class_labels) and not (0 <= int(class_labels.min()) and int(class_labels.max()) < num_classes):
        raise ValueError(f"class labels must lie in [0, {num_classes - 1}] for this model, "
                         f"got values from {int(class_labels.min())} to {int(class_labels.max())}")


def guided(model, class_labels: torch.Tensor, guidance: float) -> EpsModel:
    """The ε-model x_t, t ↦ (1 + w)·ε̂(x_t, t, c) − w·ε̂(x_t, t, ∅) for per-sample classes `class_labels` [B].

    For w = 0 only the conditional pass runs; otherwise both run as one forward pass of batch 2B.
    """
    check_class_labels(model, class_labels, guidance)
    on_device: dict[torch.device, torch.Tensor] = {}

    def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x_t.shape[0] != len(class_labels):
            raise ValueError(f"{len(class_labels)} class labels for a batch of {x_t.shape[0]} images")
        step_labels = on_device.get(x_t.device)
        if step_labels is None:
            step_labels = on_device[x_t.device] = class_labels.to(x_t.device)
        return guided_eps(model, x_t, t, step_labels, guidance)

    return eps


def guided_eps(model, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor,
               guidance: float) -> torch.Tensor:
    """(1 + w)·ε̂(x_t, t, c) − w·ε̂(x_t, t, ∅) (eq. 6) for per-image labels c [B], the two passes as one forward
    pass of batch 2B; ε̂(x_t, t, c) alone for w = 0. An image whose label is already ∅ gets ε̂(x_t, t, ∅)."""
    if guidance == 0:
        return model(x_t, t, class_labels=class_labels)
    null_labels = torch.full_like(class_labels, num_classes_of(model))
    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), class_labels=torch.cat([class_labels, null_labels]))
    conditional, unconditional = both.chunk(2)
    return (1 + guidance) * conditional - guidance * unconditional


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """0, 1, …, K−1, 0, 1, …: every class equally often (up to one), for pictures (`diffusion sample`);
    scored samples follow the reference split's class mix instead (evaluation.protocol.scoring_labels)."""
    return torch.arange(num_samples) % num_classes


def parse_classes(text: str, num_classes: int) -> list[int]:
    """'7' → [7]; '1,3,5' → [1, 3, 5]; 'all' → [0, …, K−1]. Raises ValueError naming the allowed range."""
    if text.strip().lower() == "all":
        return list(range(num_classes))
    try:
        classes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--class takes class numbers like 7 or 1,3,5 or 'all', got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise ValueError(f"--class values must lie in [0, {num_classes - 1}], got {text!r}")
    return classes
