"""`selfsup report RUN [RUN ...] -o report.html`: one self-contained HTML page of one or several
runs side by side (pictures inside the file, no script, no network).

An image run shows its curves, few-label results, embedding map, nearest neighbours, sample grids
and augmentations; a language run its curves, results and what its stages wrote. What a run
folder lacks is listed on the page, never raised.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfsup.core.errors import SelfsupError
from selfsup.core.run import RUN_INFO
from selfsup.reporting.common import flatten, read_json, run_kind
from selfsup.reporting.image_run import APPROX, image_sections, summary_row
from selfsup.reporting.language_run import language_sections
from selfsup.reporting.page import RunPage, Section, esc, pre, render, table

REPORT = "report.html"


def report(
    runs: str | Path | Sequence[str | Path],
    out: str | Path | None = None,
    *,
    title: str | None = None,
    embeddings: bool = True,
) -> Path:
    """Write the HTML report of `runs` to `out` (default: RUN/report.html of a single run);
    returns its path. `embeddings=False` skips the sections that run the encoder."""
    from selfsup.core.run import atomic_write_text, run_locked

    runs = [Path(runs)] if isinstance(runs, str | Path) else [Path(r) for r in runs]
    if not runs:
        raise SelfsupError("name at least one run directory")
    for run in runs:
        if not run.is_dir():
            raise SelfsupError(f"run directory {run} does not exist")
    if out is None:
        if len(runs) > 1:
            raise SelfsupError("several runs: name the page to write with -o FILE.html")
        out = runs[0] / REPORT
    out = Path(out)
    names = _names(runs)
    inside = [r for r in runs if out.resolve().is_relative_to(r.resolve())]
    with run_locked(inside[0]) if inside else contextlib.nullcontext():  # one writer per run
        pages = [
            run_page(run, name, embeddings=embeddings)
            for run, name in zip(runs, names, strict=True)
        ]
        title = title or ("selfsup: " + " vs ".join(names))
        page = render(pages, title, _summary(runs, pages))
        atomic_write_text(out, page)
    return out


def write_run_report(run: str | Path, *, embeddings: bool = True) -> Path | None:
    """Write or refresh RUN/report.html at the end of a stage and return its path. Never raises
    (the stage's results matter more): a failure is printed as one line and returns None."""
    if os.environ.get("SELFSUP_REPORT", "1") == "0":
        return None
    try:
        return report(run, embeddings=embeddings)
    except Exception as e:  # noqa: BLE001 - a report must not lose a finished run
        if os.environ.get("SELFSUP_DEBUG"):
            raise
        print(f"selfsup: report not written ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def _names(runs: list[Path]) -> list[str]:
    names = [r.resolve().name or str(r) for r in runs]
    if len(set(names)) < len(names):  # same last folder name: use the given paths
        names = [str(r) for r in runs]
    return names


def run_page(run: Path, name: str, *, embeddings: bool = True) -> RunPage:
    """Every section of one run that its folder allows, and what is missing."""
    kind, config = run_kind(run)
    page = RunPage(name, kind)
    if not config:
        page.missing.append("config.yaml (unreadable or absent: not a finished selfsup run?)")
    if kind == "image":
        image_sections(run, config, page, embeddings=embeddings)
    else:
        language_sections(run, config, page)
    page.sections.append(_about(run, config))
    return page


def _about(run: Path, config: dict[str, Any]) -> Section:
    s = Section("about", "Configuration, command, versions")
    command = run / "command.txt"
    if command.is_file():
        s.body += "<p><b>command</b></p>" + pre(command.read_text(errors="replace").strip())
    info = read_json(run / RUN_INFO)
    if info and info.get("sessions"):
        rows = [
            (
                x.get("finished", ""),
                f"{x.get('wall_seconds', 0):.1f}",
                x.get("images_per_second", ""),
                x.get("device", ""),
                ", ".join(f"{k} {v}" for k, v in (x.get("versions") or {}).items()),
            )
            for x in info["sessions"]
        ]
        s.body += "<p><b>training sessions</b></p>" + table(
            ["finished", "wall time (s)", "images/s", "device", "versions"], rows
        )
    if config:
        flat = [(k, v) for k, v in flatten(config) if not k.startswith("encoder.m")]
        s.body += "<p><b>config.yaml</b></p>" + table(["option", "value"], flat)
    return s


def _summary(runs: list[Path], pages: list[RunPage]) -> str:
    rows = []
    for run, page in zip(runs, pages, strict=True):
        rows.append([page.name, page.kind, *summary_row(run)])
    header = ["run", "kind", "what", "steps", "final loss", "probe / val", "few-label", "wall (s)"]
    approx = (
        f"<p>{APPROX}: wall time from the run folder's file times (config.yaml to the last "
        "metrics row or checkpoint; pauses between resumed sessions included)</p>"
        if any(str(r[-1]).startswith(APPROX) for r in rows)
        else ""
    )
    return "<h2>Summary</h2>" + table(header, rows) + approx + f"<p>{esc(_generated())}</p>"


def _generated() -> str:
    from selfsup.core import __version__

    return f"written {time.strftime('%Y-%m-%d %H:%M')} by selfsup {__version__} (selfsup report)"
