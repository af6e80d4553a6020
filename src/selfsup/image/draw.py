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


def save(fig: Figure, out: str | Path, *, tight: bool = True) -> Path:
    """Write the figure as a PNG (creating its folder), cropped to what is drawn when `tight`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight" if tight else None)
    return out


def _rgb(img: Tensor) -> np.ndarray:
    """A C×H×W float image in [0, 1] as H×W×3 (gray repeated), as `show` draws it."""
    arr = img.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[..., :3]


def mosaic(cells: Sequence[Sequence[tuple[Tensor | None, str | None]]], out: str | Path) -> Path:
    """A grid of (image, title) cells (rows of equal length; None leaves a cell blank) drawn as
    ONE image in one axes, each title over its cell: the picture of a grid of separate axes
    (1.1 inches a cell), at a fraction of the cost (24 axes took ~0.3-0.7 s an epoch)."""
    images = [img for row in cells for img, _ in row if img is not None]
    h = max(int(img.shape[-2]) for img in images)
    w = max(int(img.shape[-1]) for img in images)
    gap = max(1, round(0.12 * max(h, w)))
    band = round(0.22 * h)  # room for a title over a row that has one
    n_cols = max(len(row) for row in cells)
    tops, y = [], 0
    for row in cells:
        y += band if any(t for _, t in row) else gap
        tops.append(y)
        y += h
    canvas = np.ones((y + gap, n_cols * (w + gap) + gap, 3))
    titles = []
    for r, row in enumerate(cells):
        for c, (img, title) in enumerate(row):
            left = gap + c * (w + gap)
            if img is not None:
                arr = _rgb(img)
                dy, dx = (h - arr.shape[0]) // 2, (w - arr.shape[1]) // 2
                top = tops[r] + dy
                canvas[top : top + arr.shape[0], left + dx : left + dx + arr.shape[1]] = arr
            if title:
                titles.append((left + w / 2 - 0.5, tops[r] - 0.5 - 0.03 * h, title))
    width = 1.1 * canvas.shape[1] / (w + gap)
    fig = Figure(figsize=(width, width * canvas.shape[0] / canvas.shape[1]))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for x, y_text, title in titles:
        ax.text(x, y_text, title, ha="center", va="bottom", fontsize=9)
    return save(fig, out, tight=False)  # the canvas has room for the titles: one draw, not two


def image_rows(rows: Sequence[tuple[str, Tensor]], out: str | Path) -> Path:
    """One row per (label, float [0, 1] batch B×C×H×W), the label over its first image: the
    sample grids of the methods (input, then what the method makes of it, then the truth)."""
    count = len(rows[0][1])
    return mosaic(
        [[(images[i], label if i == 0 else None) for i in range(count)] for label, images in rows],
        out,
    )


def image_columns(columns: Sequence[tuple[str, Tensor]], out: str | Path) -> Path:
    """One column per (label, float [0, 1] batch), the label over the column: one image per row
    with its views beside it."""
    count = len(columns[0][1])
    return mosaic(
        [
            [(images[i], label if i == 0 else None) for label, images in columns]
            for i in range(count)
        ],
        out,
    )


def image_sheet(
    images: Tensor, out: str | Path, titles: Sequence[str] = (), columns: int = 8
) -> Path:
    """A contact sheet: float [0, 1] images B×C×H×W in rows of `columns`, each with its title."""
    rows = -(-len(images) // columns)
    cells = [
        (images[i], titles[i] if i < len(titles) else None) if i < len(images) else (None, None)
        for i in range(rows * columns)
    ]
    return mosaic([cells[r * columns : (r + 1) * columns] for r in range(rows)], out)
