"""Small matplotlib helpers for influence results.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas directly, never
through ``pyplot``, so nothing here touches global plotting state or needs a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import InputError

__all__ = [
    "ScatterStyle",
    "new_figure",
    "save_figure",
    "scatter_predicted_actual",
    "show_images",
]


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64).reshape(-1)


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (4.0, 4.0)):
    """A ``Figure`` (Agg canvas) with a grid of axes; returns ``(fig, axes)`` (axes as a flat list)."""
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, list(axes.reshape(-1))


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Save ``fig`` as PNG (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


@dataclass(frozen=True)
class ScatterStyle:
    """How :func:`scatter_predicted_actual` draws.

    Attributes:
        title: axes title.
        colors: optional per-point colours.
        xlabel, ylabel: axis labels.
        annotate: write Pearson's R and Spearman's rho in the corner.
        limit: symmetric axis limit (default: from the data, equal on both axes).
        equal_axes: same limits on both axes; ``False`` gives each axis its own symmetric
            limit (useful when the predictions are off by an order of magnitude).
    """

    title: str | None = None
    colors: Sequence[Any] | None = None
    xlabel: str = "Actual diff in loss"
    ylabel: str = "Predicted diff in loss"
    annotate: bool = True
    limit: float | None = None
    equal_axes: bool = True

    def __post_init__(self) -> None:
        if self.limit is not None and not float(self.limit) > 0:
            raise InputError(f"limit must be a positive number or None, got {self.limit}")


def scatter_predicted_actual(
    actual: Any,
    predicted: Any,
    path: str | Path | None = None,
    *,
    ax: Axes | None = None,
    style: ScatterStyle = ScatterStyle(),
) -> Axes:
    """Scatter of predicted (y) against actual (x) changes with the ``y = x`` line.

    Args:
        actual, predicted: 1-d arrays/tensors of equal length.
        path: save the figure here as PNG (only when ``ax`` is not given).
        ax: draw into these axes instead of a new figure.
        style: title, labels, colours, limits (:class:`ScatterStyle`).

    Returns:
        The axes.
    """
    from scipy import stats

    a, p = _np(actual), _np(predicted)
    fig = None
    if ax is None:
        fig, (ax,) = new_figure(1, 1, (4.2, 4.2))
    ax.scatter(
        a, p, s=10, c=style.colors if style.colors is not None else "tab:blue", alpha=0.7, lw=0
    )
    if style.equal_axes:
        lim = float(max(np.abs(a).max(), np.abs(p).max(), 1e-12))
        xlim = ylim = style.limit if style.limit is not None else 1.05 * lim
    else:
        xlim = 1.05 * float(max(np.abs(a).max(), 1e-12))
        ylim = 1.05 * float(max(np.abs(p).max(), 1e-12))
    big = max(xlim, ylim)
    ax.plot([-big, big], [-big, big], color="0.4", lw=0.8, ls="--", label="y = x")
    ax.set_xlim(-xlim, xlim)
    ax.set_ylim(-ylim, ylim)
    if style.equal_axes:
        ax.set_aspect("equal")
    ax.axhline(0, color="0.85", lw=0.5, zorder=0)
    ax.axvline(0, color="0.85", lw=0.5, zorder=0)
    ax.set_xlabel(style.xlabel)
    ax.set_ylabel(style.ylabel)
    if style.title:
        ax.set_title(style.title)
    if style.annotate and len(a) >= 3 and np.std(a) > 0 and np.std(p) > 0:
        r = stats.pearsonr(a, p)[0]
        rho = stats.spearmanr(a, p)[0]
        ax.text(
            0.03,
            0.97,
            f"Pearson R = {r:.3f}\nSpearman = {rho:.3f}\nn = {len(a)}",
            transform=ax.transAxes,
            va="top",
            fontsize=8,
        )
    if fig is not None and path is not None:
        save_figure(fig, path)
    return ax


def show_images(
    images: Sequence[Any],
    titles: Sequence[str],
    path: str | Path | None = None,
    shape: tuple[int, int] = (28, 28),
    cmap: str = "gray",
) -> Figure:
    """A row of grey-scale images (e.g. a test image and influential training images)."""
    fig, axes = new_figure(len(images), 1, (2.2, 2.4))
    for ax, img, t in zip(axes, images, titles):
        ax.imshow(_np(img).reshape(shape), cmap=cmap)
        ax.set_title(t, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if path is not None:
        save_figure(fig, path)
    return fig
