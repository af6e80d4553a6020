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


def curve_figure(
    runs: list[tuple[str, list[dict[str, float]]]], columns: list[str], title: str
) -> Figure | None:
    """One plot of `columns` against the log's step column, for one or several runs."""
    fig = Figure(figsize=(5.6, 3.2), layout="constrained")
    ax = fig.add_subplot()
    drawn = 0
    for name, rows in runs:
        x = x_column(rows)
        if x is None:
            continue
        for c in columns:
            xs, ys = series(rows, c, x)
            if not xs:
                continue
            label = c if len(runs) == 1 else f"{name}: {c}"
            few = len(xs) <= 30
            ax.plot(xs, ys, marker="o" if few else None, ms=3, lw=1.4, label=label)
            drawn += 1
            ax.set_xlabel(x)
    if not drawn:
        return None
    ys = [y for line in ax.get_lines() for y in line.get_ydata()]
    if title == "loss" and min(ys) > 0 and max(ys) / min(ys) > 30:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
