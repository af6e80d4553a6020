"""`selfsup report RUN [RUN ...] -o report.html`: one self-contained HTML page of one or several
runs side by side (pictures inside the file, no script, no network).

An image run shows its curves, few-label results, embedding map, nearest neighbours, sample grids
and augmentations; a language run its curves, results and what its stages wrote. What a run
folder lacks is listed on the page, never raised.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfsup.core.errors import SelfsupError
from selfsup.core.run import RUN_INFO
from selfsup.reporting.page import RunPage, Section, esc, render, table

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


def run_kind(run: Path) -> tuple[str, dict[str, Any]]:
    """('image' | 'language' | 'unknown', the run's config.yaml or {})."""
    import yaml

    try:
        config = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return "unknown", {}
    if not isinstance(config, dict):
        return "unknown", {}
    if "encoder" in config and "method" in config:
        return "image", config
    if "model" in config or "stage" in config:
        return "language", config
    return "unknown", config


def run_page(run: Path, name: str, *, embeddings: bool = True) -> RunPage:
    """Every section of one run that its folder allows, and what is missing."""
    kind, config = run_kind(run)
    page = RunPage(name, kind)
    if not config:
        page.missing.append("config.yaml (unreadable or absent: not a finished selfsup run?)")
    if kind == "image":
        from selfsup.reporting.image_run import image_sections

        image_sections(run, config, page, embeddings=embeddings)
    else:
        from selfsup.reporting.language_run import language_sections

        language_sections(run, config, page)
    page.sections.append(_about(run, config))
    return page


def _about(run: Path, config: dict[str, Any]) -> Section:
    from selfsup.reporting.page import pre

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
        flat = [(k, v) for k, v in _flatten(config) if not k.startswith("encoder.m")]
        s.body += "<p><b>config.yaml</b></p>" + table(["option", "value"], flat)
    return s


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, list) and len(v) > 12:
            out.append((f"{prefix}{k}", f"{len(v)} values: {', '.join(map(str, v[:12]))}, ..."))
        else:
            out.append((f"{prefix}{k}", v if not isinstance(v, list) else ", ".join(map(str, v))))
    return out


def read_json(path: Path) -> Any:
    """A JSON file's contents, or None when absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _summary(runs: list[Path], pages: list[RunPage]) -> str:
    rows = []
    for run, page in zip(runs, pages, strict=True):
        from selfsup.reporting.image_run import summary_row

        rows.append([page.name, page.kind, *summary_row(run)])
    header = ["run", "kind", "what", "steps", "final loss", "probe / val", "few-label", "wall (s)"]
    from selfsup.reporting.image_run import APPROX

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
