"""Plots of evaluation results (PNG, written atomically), made from the flat metric dicts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..figures import new_figure, save_png
from .evaluator import guidance_suffix

_GUIDED_TAG = re.compile(r"^fid_(?P<extractor>[a-z0-9]+)_(?P<sampler>[a-z0-9]+)_w(?P<w>[0-9.e+-]+)$")
_SAMPLER_TAG = re.compile(r"^fid_(?P<extractor>[a-z0-9]+)_(?P<sampler>ddpm|ddim|dpmpp2msde|dpmpp2m)(?P<steps>[0-9]+)(?P<suffix>_w[0-9.e+-]+)?$")
SAMPLER_LABELS = {"ddpm": "DDPM", "ddim": "DDIM (η = 0)", "dpmpp2m": "DPM-Solver++(2M)",
                  "dpmpp2msde": "SDE-DPM-Solver++(2M)"}


def guidance_sweep(metrics: dict[str, Any], extractor: str, sampler_tag: str) -> list[tuple[float, dict[str, float]]]:
    """[(w, {'fid': …, 'fid_classmean': …, 'class_consistency': …}), …] sorted by w, for the keys
    `<metric>_<extractor>_<sampler_tag>_w<w>` found in `metrics`."""
    rows = []
    for key in metrics:
        match = _GUIDED_TAG.match(key)
        if not match or match["extractor"] != extractor or match["sampler"] != sampler_tag:
            continue
        tag = f"{extractor}_{sampler_tag}_w{match['w']}"
        values = {"fid": metrics[key]}
        for name, full in (("fid_classmean", f"fid_{tag}_classmean"), ("class_consistency", f"class_consistency_{tag}")):
            if full in metrics:
                values[name] = metrics[full]
        rows.append((float(match["w"]), values))
    return sorted(rows, key=lambda row: row[0])


def fid_by_nfe(metrics: dict[str, Any], extractor: str, guidance: float | None = None) -> dict[str, list[tuple[int, float]]]:
    """{sampler: [(network evaluations, FID), …] sorted}, from keys `fid_<extractor>_<sampler><steps>`
    (with `guidance`, only the samples drawn at that guidance weight: `…_w3`)."""
    suffix = guidance_suffix(guidance)
    curves: dict[str, list[tuple[int, float]]] = {}
    for key, value in metrics.items():
        match = _SAMPLER_TAG.match(key)
        if match and match["extractor"] == extractor and (match["suffix"] or "") == suffix:
            curves.setdefault(match["sampler"], []).append((int(match["steps"]), float(value)))
    return {sampler: sorted(points) for sampler, points in sorted(curves.items())}


def plot_fid_vs_nfe(metrics: dict[str, Any], extractor: str, png: str | Path,
                    guidance: float | None = None) -> Path | None:
    """FID against the number of network evaluations per image, one line per sampler (log x axis):
    quality per unit of sampling cost. None unless some sampler was scored at two or more step counts."""
    curves = fid_by_nfe(metrics, extractor, guidance)
    if not any(len(points) > 1 for points in curves.values()):
        return None
    fig, ax = new_figure(1)
    for sampler, points in curves.items():
        ax.plot([n for n, _ in points], [f for _, f in points], "o-", label=SAMPLER_LABELS.get(sampler, sampler))
    ax.set(xscale="log", yscale="log", xlabel="network evaluations per image", ylabel=f"FID ({extractor} features)",
           title=f"FID against sampling cost{'' if guidance is None else f' (guidance {guidance:g})'}")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):  # plain numbers (10, 20, 50), not 2×10¹
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sorted({n for points in curves.values() for n, _ in points}))
    fids = [f for points in curves.values() for _, f in points if f > 0]
    if fids:  # 1-2-3-5-7 ticks between the lowest and highest FID
        ax.set_yticks([m * 10.0**e for e in range(-2, 6) for m in (1, 2, 3, 5, 7)
                       if min(fids) * 0.9 <= m * 10.0**e <= max(fids) * 1.1])
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_png(fig, png)


def plot_guidance_sweep(metrics: dict[str, Any], extractor: str, sampler_tag: str, png: str | Path) -> Path | None:
    """FID (overall and mean per class) and class consistency against the guidance weight w: the
    quality/diversity trade-off of classifier-free guidance. None if fewer than two weights were scored."""
    rows = guidance_sweep(metrics, extractor, sampler_tag)
    if len(rows) < 2:
        return None
    weights = [w for w, _ in rows]
    fig, (left, right) = new_figure(2)
    left.plot(weights, [v["fid"] for _, v in rows], "o-", label="all classes")
    if all("fid_classmean" in v for _, v in rows):
        left.plot(weights, [v["fid_classmean"] for _, v in rows], "s--", label="mean over classes")
    left.set(xlabel="guidance weight w", ylabel=f"FID ({extractor} features)", title=f"{sampler_tag}: FID")
    left.legend()
    if all("class_consistency" in v for _, v in rows):
        right.plot(weights, [v["class_consistency"] for _, v in rows], "o-", color="tab:green")
        right.set_ylim(0, 1.02)
    right.set(xlabel="guidance weight w", ylabel="share classified as the requested class",
              title="class consistency")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return save_png(fig, png)
