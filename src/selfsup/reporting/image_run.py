"""The sections of an image run (`selfsup pretrain`, `selfsup evaluate`) from its folder."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from selfsup.reporting.common import read_json, run_kind
from selfsup.reporting.curves import curve_figure, groups, read_csv
from selfsup.reporting.page import RunPage, Section, fig_img, img, note, table


def image_sections(run: Path, config: dict[str, Any], page: RunPage, *, embeddings: bool) -> None:
    page.sections.append(curves_section(run, page))
    page.sections += few_label_sections(run, page)
    if not (run / "encoder.safetensors").is_file():
        page.missing.append("encoder.safetensors (no epoch finished): no map or neighbours")
    elif embeddings:
        try:
            from selfsup.reporting.images import embedding_sections

            page.sections += embedding_sections(run, config)
        except Exception as e:  # noqa: BLE001 - data moved, unreadable weights...: say so
            if os.environ.get("SELFSUP_DEBUG"):
                raise
            s = Section("map", "Embedding map (t-SNE)")
            s.notes.append(f"no map or neighbours: {type(e).__name__}: {_one_line(e)}")
            page.sections.append(s)
    page.sections.append(samples_section(run, page))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def curves_section(run: Path, page: RunPage, files: tuple[str, ...] = ("metrics.csv",)) -> Section:
    s = Section("curves", "Training curves")
    for name in files:
        path = run / name
        if not path.is_file():
            page.missing.append(f"{name} (no metrics logged yet)")
            s.notes.append(f"{name} is missing")
            continue
        rows = read_csv(path)
        for title, columns in groups(rows).items():
            fig = curve_figure([(page.name, rows)], columns, title)
            if fig is not None:
                s.body += fig_img(fig, f"{title} curve ({name})", f"{name}: {', '.join(columns)}")
        if not rows:
            s.notes.append(f"{name} has no rows yet")
    return s


def few_label_sections(run: Path, page: RunPage) -> list[Section]:
    found = sorted((run / "eval").glob("*/results.json")) if (run / "eval").is_dir() else []
    results = [(p.parent, read_json(p)) for p in found]
    results = [(d, r) for d, r in results if isinstance(r, dict) and r.get("few_label")]
    s = Section("few_label", "Few-label accuracy (frozen features)")
    if not results:
        page.missing.append(f"eval/*/results.json (not evaluated yet: selfsup evaluate {run})")
        s.notes.append("not evaluated yet")
        return [s]
    sections = [s]
    for folder, r in results:
        s.body += few_label_html(folder, r)
        if "shift" in r:
            sh = Section("shift", "Accuracy under distribution shift")
            sh.body = shift_html(folder, r)
            sections.append(sh)
    return sections


def few_label_html(folder: Path, r: dict[str, Any]) -> str:
    from selfsup.image.evaluation.report import noise_levels, summarize

    rows = r["few_label"]
    head = (
        f"<p><b>{r.get('data', folder.name)}</b>: {r.get('train_size', '?')} train / "
        f"{r.get('test_size', '?')} test images; linear probe (all labels) "
        f"{_pct(r.get('linear_probe'))}, kNN {_pct(r.get('knn'))}"
    )
    km = r.get("kmeans")
    head += f", k-means accuracy {_pct(km.get('acc'))} (NMI {km.get('nmi', 0):.3f})" if km else ""
    html = head + "</p>" + _summary_table(summarize(rows), "clean labels")
    for rate in noise_levels(rows):
        html += _summary_table(summarize(rows, rate), f"{100 * rate:g}% of the labels flipped")
    if (folder / "few_label.png").is_file():
        html += img((folder / "few_label.png").read_bytes(), "few-label accuracy plot")
    return html


def _summary_table(summary: list[dict], caption: str) -> str:
    fractions = sorted({x["fraction"] for x in summary})
    methods = list(dict.fromkeys(x["method"] for x in summary))
    cell = {(x["method"], x["fraction"]): x for x in summary}
    header = ["method", *(f"{100 * f:g}%" for f in fractions)]
    body = [[m, *(_mean_std(cell.get((m, f))) for f in fractions)] for m in methods]
    labels = ["labels", *(f"{cell_n(cell, f):.0f}" for f in fractions)]
    return f"<p>accuracy (%), mean ± std over label subsets; {caption}</p>" + table(
        header, [labels, *body]
    )


def cell_n(cell: dict, fraction: float) -> float:
    return next((x["n_labels"] for (m, f), x in cell.items() if f == fraction), 0.0)


def _mean_std(x: dict | None) -> str:
    return "-" if x is None else f"{100 * x['mean']:.1f} ± {100 * x['std']:.1f}"


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, int | float) else "-"


def shift_html(folder: Path, r: dict[str, Any]) -> str:
    corruptions = r.get("shift_corruptions") or []
    header = ["representation", "clean", *(f"{c} {s}" for c in corruptions for s in (1, 2, 3))]
    rows = []
    for name, row in r["shift"].items():
        cells = [f"{100 * v:.1f}" for c in corruptions for v in row.get(c, [])]
        rows.append([name, f"{100 * row.get('clean', 0):.1f}", *cells])
    html = "<p>accuracy (%) of a probe trained on clean labels, at severities 1/2/3</p>"
    html += table(header, rows)
    if (folder / "shift.png").is_file():
        html += img((folder / "shift.png").read_bytes(), "accuracy against corruption severity")
    return html


def samples_section(run: Path, page: RunPage) -> Section:
    s = Section("samples", "Sample grids: first and last epoch")
    grids = sorted(
        (run / "samples").glob("epoch*.png"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0)
    )
    if not grids:
        page.missing.append("samples/epochNNN.png (no epoch finished)")
        s.notes.append("no sample grid yet")
        return s
    for p in dict.fromkeys([grids[0], grids[-1]]):
        s.body += img(p.read_bytes(), f"sample grid {p.stem}", caption=f"samples/{p.name}")
    return s


def summary_row(run: Path) -> list[str]:
    """what, steps, final loss, probe/val, few-label, wall time: one line per run."""
    kind, config = run_kind(run)
    what = " ".join(
        str(config[k]) for k in ("method", "model", "stage", "data") if config.get(k) is not None
    )
    last: dict[str, float] = {}
    for name in ("metrics.csv", "eval.csv"):
        if (run / name).is_file():
            for row in read_csv(run / name):
                last.update(row)
    steps = next((f"{k} {last[k]:.0f}" for k in ("step", "iteration", "epoch") if k in last), "-")
    loss = next((f"{last[k]:.4f}" for k in ("train/loss", "train_loss", "loss") if k in last), "-")
    probe = "-"
    if "test/probe_acc" in last:
        probe = f"online probe {100 * last['test/probe_acc']:.1f}%"
    elif any(k in last for k in ("val/loss", "val_loss")):
        probe = f"val loss {last.get('val/loss', last.get('val_loss')):.4f}"
    few = "-"
    for p in sorted((run / "eval").glob("*/results.json")) if (run / "eval").is_dir() else []:
        r = read_json(p) or {}
        if isinstance(r.get("linear_probe"), int | float):
            few = f"linear probe {100 * r['linear_probe']:.1f}% ({p.parent.name})"
    info = read_json(run / "run_info.json") or {}
    results = read_json(run / "results.json") or {}
    wall = sum(x.get("wall_seconds") or 0 for x in info.get("sessions", []))
    wall = wall or results.get("train_seconds") or results.get("seconds") or 0
    span = 0.0 if wall else file_span(run)
    shown = f"{wall:.0f}" if wall else f"{APPROX}{span:.0f}" if span else "-"
    return [what or "-", steps, loss, probe, few, shown]


APPROX = "≈"  # a wall time read from the run folder's file times (file_span)
LAST_WRITTEN = ("metrics.csv", "eval.csv", "results.json", "checkpoints", "hf")


def file_span(run: Path) -> float:
    """Seconds from config.yaml (written as a stage starts) to the newest of what a stage writes
    as it goes (LAST_WRITTEN): the wall time of a run that records none (0 when unknown);
    pauses between resumed sessions are included."""
    try:
        start = (run / "config.yaml").stat().st_mtime
    except OSError:
        return 0.0
    paths = [run / n for n in LAST_WRITTEN]
    paths += [c for p in paths if p.is_dir() for c in p.iterdir()]
    ends = [p.stat().st_mtime for p in paths if p.is_file()]
    return max(0.0, max(ends) - start) if ends else 0.0


__all__ = ["image_sections", "summary_row", "note"]
