"""What every section of the report reads from a run folder: its kind, its JSON files, and a
nested config or result flattened into rows. Below the section modules, so that they and the
page (reporting/__init__.py) import it and never each other in a circle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path) -> Any:
    """A JSON file's contents, or None when absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) rows of a nested dict; a long list shows its length and first 12."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += flatten(v, f"{prefix}{k}.")
        elif isinstance(v, list) and len(v) > 12:
            out.append((f"{prefix}{k}", f"{len(v)} values: {', '.join(map(str, v[:12]))}, ..."))
        else:
            out.append((f"{prefix}{k}", v if not isinstance(v, list) else ", ".join(map(str, v))))
    return out
