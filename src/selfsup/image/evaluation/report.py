"""Few-label results: summary statistics, a text table, JSON/CSV files and the accuracy plot."""

from __future__ import annotations

import csv
import io
import json
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

METHOD_ORDER = ("selfsup", "random", "raw", "pca", "supervised")


def _method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _fraction_label(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def summarize(rows: list[dict], label_noise: float = 0.0) -> list[dict]:
    """Mean and std (sample std; 0 for one seed) of accuracy over seeds per method × fraction,
    methods in table order, fractions ascending; rows of that `label_noise` (0: clean) only."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("label_noise", 0.0) == label_noise:
            groups[row["method"], row["fraction"]].append(row)
    out = []
    for method, fraction in sorted(groups, key=lambda k: (_method_key(k[0]), k[1])):
        group = groups[method, fraction]
        acc = np.array([r["accuracy"] for r in group])
        out.append(
            {
                "method": method,
                "fraction": fraction,
                "n_labels": float(np.mean([r["n_labels"] for r in group])),
                "mean": float(acc.mean()),
                "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                "n_seeds": len(acc),
            }
        )
    return out


def noise_levels(rows: list[dict]) -> list[float]:
    """The label-noise rates of the rows, ascending (without 0, the clean rows)."""
    return sorted({r["label_noise"] for r in rows if r.get("label_noise", 0.0) > 0})


def format_table(rows: list[dict], label_noise: float = 0.0) -> str:
    """A text table: one line per method, one column per label fraction, "mean ± std" in %
    (rows of that `label_noise`; 0: clean)."""
    summary = summarize(rows, label_noise)
    fractions = sorted({s["fraction"] for s in summary})
    methods = list(dict.fromkeys(s["method"] for s in summary))
    cells = {
        (s["method"], s["fraction"]): f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
        for s in summary
    }
    table = [["method", *map(_fraction_label, fractions)]]
    table += [[m, *(cells.get((m, f), "-") for f in fractions)] for m in methods]
    first = max(len(line[0]) for line in table)
    col = max(len(c) for line in table for c in line[1:])
    lines = ["  ".join([line[0].ljust(first), *(c.rjust(col) for c in line[1:])]) for line in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_results(
    rows: list[dict], out_dir: str | Path, name: str = "few_label"
) -> tuple[Path, Path]:
    """Write `rows` to out_dir/name.json and out_dir/name.csv (atomically); return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{name}.json", out_dir / f"{name}.csv"
    _atomic_write(json_path, lambda p: p.write_text(json.dumps(rows, indent=2) + "\n"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(csv_path, lambda p: p.write_text(buf.getvalue()))
    return json_path, csv_path


def plot_few_label(rows: list[dict], out_png: str | Path) -> Path:
    """Accuracy (%) against label fraction (log x axis), one line with error bars per method."""
    summary = summarize(rows)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for method in dict.fromkeys(s["method"] for s in summary):
        pts = [s for s in summary if s["method"] == method]
        ax.errorbar(
            [s["fraction"] for s in pts],
            [100 * s["mean"] for s in pts],
            yerr=[100 * s["std"] for s in pts],
            marker="o",
            capsize=3,
            label=method,
        )
    fractions = sorted({s["fraction"] for s in summary})
    ax.set_xscale("log")
    ax.set_xticks(fractions, [_fraction_label(f) for f in fractions])
    ax.minorticks_off()
    ax.set(xlabel="labeled fraction of the training set", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_png, lambda p: fig.savefig(p, format="png", dpi=120))
    return out_png


def plot_label_noise(rows: list[dict], out_png: str | Path) -> Path:
    """Accuracy (%) against the fraction of flipped labels (0 = clean), one panel per label
    fraction, one line with error bars per method."""
    rates = [0.0, *noise_levels(rows)]
    fractions = sorted({r["fraction"] for r in rows})
    fig = Figure(figsize=(4 * len(fractions), 3.5), layout="constrained")
    axes = fig.subplots(1, len(fractions), squeeze=False)[0]
    for ax, fraction in zip(axes, fractions, strict=True):
        by_rate = {
            rate: {s["method"]: s for s in summarize(rows, rate) if s["fraction"] == fraction}
            for rate in rates
        }
        for method in by_rate[0.0]:
            pts = [(rate, by_rate[rate][method]) for rate in rates if method in by_rate[rate]]
            ax.errorbar(
                [100 * rate for rate, _ in pts],
                [100 * s["mean"] for _, s in pts],
                yerr=[100 * s["std"] for _, s in pts],
                marker="o",
                capsize=3,
                label=method,
            )
        ax.set_xticks([100 * r for r in rates])
        ax.set(
            title=f"{_fraction_label(fraction)} of the labels",
            xlabel="labels flipped (%)",
            ylabel="test accuracy (%)",
        )
        ax.grid(alpha=0.3)
    axes[0].legend()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_png, lambda p: fig.savefig(p, format="png", dpi=120))
    return out_png
