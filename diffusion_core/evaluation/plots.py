"""Plots of evaluation results (PNG, written atomically), made from the flat metric dicts.

FID is biased upwards by an amount that depends on the number of images N, so every point is drawn
with its N: points of different N are never joined into one line, and each line's legend entry names its N.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
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


SampleSizes = int | Mapping[str, int]  # images behind every point, or per tag (`ddim50`, `ddim50_w3`)
_MARKERS = ("o", "s", "D", "^", "v")


def _size(num_samples: SampleSizes, tag: str) -> int:
    if isinstance(num_samples, int):
        return num_samples
    if tag not in num_samples:
        raise ValueError(f"no sample count for {tag!r} (have {sorted(num_samples)}): pass the N of every scored tag")
    return num_samples[tag]


def _by_size(points: list[tuple[float, float, int]]) -> dict[int, list[tuple[float, float]]]:
    """{N: [(x, y), …]}, largest N first: FID's bias depends on N, so points of different N are never
    one line."""
    groups: dict[int, list[tuple[float, float]]] = {}
    for x, y, n in points:
        groups.setdefault(n, []).append((x, y))
    return {n: sorted(groups[n]) for n in sorted(groups, reverse=True)}


def _draw(ax, points: list[tuple[float, float, int]], label: str, sizes: list[int], **style) -> None:
    """One line per N of `points` (a lone point is a marker), labelled with its N; the marker tells the
    N apart (its rank in `sizes`), the colour in `style` the series."""
    for n, group in _by_size(points).items():
        ax.plot([x for x, _ in group], [y for _, y in group], marker=_MARKERS[sizes.index(n) % len(_MARKERS)],
                label=f"{label}, N = {n:,}", **style)


def draw_fid_vs_nfe(metrics: dict[str, Any], extractor: str, num_samples: SampleSizes,
                    guidance: float | None = None):
    """The figure of plot_fid_vs_nfe, or None."""
    suffix = guidance_suffix(guidance)
    curves = {sampler: [(steps, fid, _size(num_samples, f"{sampler}{steps}{suffix}")) for steps, fid in points]
              for sampler, points in fid_by_nfe(metrics, extractor, guidance).items()}
    if not any(len(group) > 1 for points in curves.values() for group in _by_size(points).values()):
        return None
    sizes = sorted({n for points in curves.values() for _, _, n in points}, reverse=True)
    fig, ax = new_figure(1)
    for i, (sampler, points) in enumerate(curves.items()):
        _draw(ax, points, SAMPLER_LABELS.get(sampler, sampler), sizes, color=f"C{i}")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations per image", ylabel=f"FID ({extractor} features)",
           title=f"FID against sampling cost{'' if guidance is None else f' (guidance {guidance:g})'}")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):  # plain numbers (10, 20, 50), not 2×10¹
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sorted({n for points in curves.values() for n, _, _ in points}))
    fids = [f for points in curves.values() for _, f, _ in points if f > 0]
    if fids:  # 1-2-3-5-7 ticks between the lowest and highest FID
        ax.set_yticks([m * 10.0**e for e in range(-2, 6) for m in (1, 2, 3, 5, 7)
                       if min(fids) * 0.9 <= m * 10.0**e <= max(fids) * 1.1])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return fig


def plot_fid_vs_nfe(metrics: dict[str, Any], extractor: str, png: str | Path, num_samples: SampleSizes,
                    guidance: float | None = None) -> Path | None:
    """FID against the number of network evaluations per image (log x axis), one line per sampler and
    sample count N (`num_samples`: one N for all, or N per tag), each labelled with its N: quality per
    unit of sampling cost. None unless some sampler was scored at two or more step counts of one N."""
    fig = draw_fid_vs_nfe(metrics, extractor, num_samples, guidance)
    return None if fig is None else save_png(fig, png)


def draw_guidance_sweep(metrics: dict[str, Any], extractor: str, sampler_tag: str, num_samples: SampleSizes):
    """The figure of plot_guidance_sweep, or None."""
    rows = [(w, values, _size(num_samples, f"{sampler_tag}{guidance_suffix(w)}"))
            for w, values in guidance_sweep(metrics, extractor, sampler_tag)]
    if len(rows) < 2:
        return None
    sizes = sorted({n for _, _, n in rows}, reverse=True)
    fig, (left, right) = new_figure(2)
    _draw(left, [(w, v["fid"], n) for w, v, n in rows], "all classes", sizes, color="C0")
    _draw(left, [(w, v["fid_classmean"], n) for w, v, n in rows if "fid_classmean" in v], "mean over classes",
          sizes, color="C1", linestyle="--")
    left.set(xlabel="guidance weight w", ylabel=f"FID ({extractor} features)", title=f"{sampler_tag}: FID")
    left.legend(fontsize="small")
    _draw(right, [(w, v["class_consistency"], n) for w, v, n in rows if "class_consistency" in v],
          "class consistency", sizes, color="C2")
    right.set_ylim(0, 1.02)
    right.set(xlabel="guidance weight w", ylabel="share classified as the requested class",
              title="class consistency")
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return fig


def plot_guidance_sweep(metrics: dict[str, Any], extractor: str, sampler_tag: str, png: str | Path,
                        num_samples: SampleSizes) -> Path | None:
    """FID (overall and mean per class) and class consistency against the guidance weight w: the
    quality/diversity trade-off of classifier-free guidance; one line per sample count N (`num_samples`:
    one N for all, or N per tag), each labelled with its N. None if fewer than two weights were scored."""
    fig = draw_guidance_sweep(metrics, extractor, sampler_tag, num_samples)
    return None if fig is None else save_png(fig, png)
