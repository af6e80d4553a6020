"""Curves from a run's CSV logs (metrics.csv, eval.csv): read without torch, drawn with
matplotlib. Columns are grouped by what they measure: losses together, learning rates together,
every other metric with its train/val twin."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from matplotlib.figure import Figure

X_COLUMNS = ("step", "iteration", "epoch")


def read_csv(path: Path) -> list[dict[str, float]]:
    """The numeric cells of a CSV log, one dict per row (empty or non-numeric cells left out)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                if k is None or v in (None, ""):
                    continue
                try:
                    value = float(v)
                except ValueError:
                    continue
                if math.isfinite(value):
                    row[k] = value
            rows.append(row)
    return rows


def x_column(rows: list[dict[str, float]]) -> str | None:
    columns = {k for r in rows for k in r}
    return next((c for c in X_COLUMNS if c in columns), None)


def metric_name(column: str) -> str:
    """'train/loss' -> 'loss', 'val_loss' -> 'loss', 'test/probe_acc' -> 'probe_acc'."""
    return re.sub(r"^(train|val|test|eval)[/_]", "", column)


def groups(rows: list[dict[str, float]]) -> dict[str, list[str]]:
    """Plot title -> the columns drawn in it, in a fixed order: losses, learning rate, the rest."""
    x = x_column(rows)
    columns = list(dict.fromkeys(k for r in rows for k in r if k not in X_COLUMNS and k != x))
    out: dict[str, list[str]] = {}
    for c in columns:
        out.setdefault(_group(metric_name(c)), []).append(c)
    order = {title: i for i, (title, _) in enumerate(GROUPS)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(GROUPS))))


GROUPS = (  # (plot title, words a column's name may contain), first match wins
    ("loss", ("loss",)),
    ("learning rate", ("lr", "learning_rate")),
    ("accuracy", ("acc", "ceiling", "agreement")),
    ("reward (proxy and gold)", ("reward", "proxy", "gold")),
    ("KL from the reference", ("kl",)),
)


def _group(name: str) -> str:
    words = re.split(r"[/_]", name)
    for title, keys in GROUPS:
        if any(k in words for k in keys):
            return title
    return name


def series(rows: list[dict[str, float]], column: str, x: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[column]) for r in rows if column in r and x in r]
    return [p[0] for p in pts], [p[1] for p in pts]


SCALE_GAP = 30  # columns whose largest values differ more than this get axes of their own


def scale_bands(
    runs: list[tuple[str, list[dict[str, float]]]], columns: list[str]
) -> list[list[str]]:
    """`columns` (those with values) in bands of one magnitude: a column whose largest |value|
    is more than SCALE_GAP times the band's smallest starts a new band (`kl` 0-5.7 and
    `approx_kl` ~0.001 are drawn on separate axes, not one flat line at zero)."""
    size: dict[str, float] = {}
    for c in columns:
        xs = [(rows, x_column(rows)) for _, rows in runs]
        values = [abs(v) for rows, x in xs if x for v in series(rows, c, x)[1]]
        if values:
            size[c] = max(values)
    bands: list[list[str]] = []
    for c in sorted(size, key=size.__getitem__):
        if bands and size[c] <= SCALE_GAP * max(size[bands[-1][0]], 1e-12):
            bands[-1].append(c)
        else:
            bands.append([c])
    order = {c: i for i, c in enumerate(columns)}
    return sorted(([c for c in columns if c in band] for band in bands), key=lambda b: order[b[0]])


def curve_figure(
    runs: list[tuple[str, list[dict[str, float]]]], columns: list[str], title: str
) -> Figure | None:
    """One plot of `columns` against the log's step column, for one or several runs; columns
    of very different magnitude (see `scale_bands`) on stacked axes sharing the step axis."""
    runs = [(name, rows) for name, rows in runs if x_column(rows) is not None]
    bands = scale_bands(runs, columns)
    if not bands:
        return None
    fig = Figure(figsize=(5.6, 3.2 + 2.2 * (len(bands) - 1)), layout="constrained")
    axes = fig.subplots(len(bands), 1, sharex=True, squeeze=False)[:, 0]
    for ax, band in zip(axes, bands, strict=True):
        for name, rows in runs:
            x = x_column(rows)
            for c in band:
                xs, ys = series(rows, c, x)  # type: ignore[arg-type]
                if not xs:
                    continue
                label = c if len(runs) == 1 else f"{name}: {c}"
                few = len(xs) <= 30
                ax.plot(xs, ys, marker="o" if few else None, ms=3, lw=1.4, label=label)
        ys = [y for line in ax.get_lines() for y in line.get_ydata()]
        if title == "loss" and min(ys) > 0 and max(ys) / min(ys) > 30:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel(x_column(runs[0][1]) or "")
    scales = " (separate axes: different scales)" if len(bands) > 1 else ""
    axes[0].set_title(title + scales, fontsize=10)
    return fig
