"""Drawing in one place: methods hand over images (tensors), this module makes the figures.

Matplotlib's object API (`Figure`, no pyplot state), so drawing is safe in any thread and
needs no display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor


def show(ax: Axes, img: Tensor, title: str | None = None) -> None:
    """Draw one C×H×W float image in [0, 1] (gray when C=1) without axes."""
    arr = img.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        ax.imshow(arr[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(arr)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def save(fig: Figure, out: str | Path) -> Path:
    """Write the figure as a PNG (creating its folder)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    return out


def image_rows(rows: Sequence[tuple[str, Tensor]], out: str | Path) -> Path:
    """One row per (label, float [0, 1] batch B×C×H×W), the label over its first image: the
    sample grids of the methods (input, then what the method makes of it, then the truth)."""
    count = len(rows[0][1])
    fig = Figure(figsize=(1.4 * count, 1.6 * len(rows)))
    axes = np.asarray(fig.subplots(len(rows), count, squeeze=False))
    for r, (label, images) in enumerate(rows):
        for i in range(count):
            show(axes[r, i], images[i], label if i == 0 else None)
    return save(fig, out)


def image_columns(columns: Sequence[tuple[str, Tensor]], out: str | Path) -> Path:
    """One column per (label, float [0, 1] batch), the label over the column: one image per row
    with its views beside it."""
    count = len(columns[0][1])
    fig = Figure(figsize=(1.6 * len(columns), 1.6 * count))
    axes = np.asarray(fig.subplots(count, len(columns), squeeze=False))
    for c, (label, images) in enumerate(columns):
        for i in range(count):
            show(axes[i, c], images[i], label if i == 0 else None)
    return save(fig, out)


def image_sheet(
    images: Tensor, out: str | Path, titles: Sequence[str] = (), columns: int = 8
) -> Path:
    """A contact sheet: float [0, 1] images B×C×H×W in rows of `columns`, each with its title."""
    rows = -(-len(images) // columns)
    fig = Figure(figsize=(1.5 * columns, 1.7 * rows))
    axes = np.asarray(fig.subplots(rows, columns, squeeze=False)).flat
    for i, ax in enumerate(axes):
        if i < len(images):
            show(ax, images[i], titles[i] if i < len(titles) else None)
        else:
            ax.set_axis_off()
    return save(fig, out)
