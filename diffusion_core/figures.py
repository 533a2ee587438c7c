"""Figures without pyplot: `matplotlib.figure.Figure` drawn by the Agg canvas, saved atomically as PNG.

pyplot is global state: its first figure resolves a GUI backend and installs an IPython display hook.
A bare `Figure` needs none of it, so plots can be drawn from any thread of a training process.
(Matplotlib still looks at an IPython module that is being imported; diffusion_core.tracking makes
sure MLflow's metrics thread never is the one importing it.)
"""

from __future__ import annotations

import io
from pathlib import Path

from .atomic import atomic_write_bytes


def new_figure(columns: int = 1, *, width_in: float | None = None, height_in: float = 3.5):
    """(figure, axes) with `columns` side-by-side axes (one Axes when columns == 1), 100 dpi."""
    from matplotlib.figure import Figure

    width_in = width_in or (4.5 * columns if columns > 1 else 6.0)
    fig = Figure(figsize=(width_in, height_in), dpi=100)
    axes = fig.subplots(1, columns)
    return fig, axes


def save_png(fig, png: str | Path, *, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay out `fig` (within `rect`, figure fractions) and write it to `png` atomically."""
    fig.tight_layout(rect=rect)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(png, buffer.getvalue())
