"""Helpers of the `selfsup lm` parsers: options mirrored from the dataclasses of
`selfsup.lm.options` (required ones marked so), deprecated spellings, run summaries."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfsup.core.config import add_option, field_types


def add_config_arguments(
    parser: Any, cls: type, defaults: dict[str, Any] | None = None, skip: Sequence[str] = ()
) -> None:
    """Mirror `cls` as `--field-name` options, with `defaults` in place of the dataclass's; a
    field declared `required=True` is a required option (its help shows no default)."""
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name not in types or f.name in skip:
            continue
        help_text = f.metadata.get("help", "")
        if f.metadata.get("required"):  # checked after --config is read (`check_required`)
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                type=types[f.name],
                default="",
                help=help_text + " (required)",
            )
        else:
            default = (defaults or {}).get(f.name, f.default)
            # an empty default ("" = not given) is not shown as "(default: )"
            add_option(parser, f.name, types[f.name], default if default != "" else None, help_text)
            parser._actions[-1].default = default
            if f.name == "resume":
                parser._actions[-1].metavar = "RUN"


def add_config_file(parser: Any) -> None:
    """`--config FILE.yaml`: the command's options from a file; flags given override it."""
    parser.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE.yaml",
        help="options from a YAML file (a run's own config.yaml repeats that run); flags given "
        "here override it",
    )


def check_required(args: argparse.Namespace, cls: type) -> None:
    """argparse's error for the required options of `cls` that neither the command line nor
    the --config file gave."""
    from selfsup.cli.main import UsageError

    missing = [
        "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(cls)
        if f.metadata.get("required") and not getattr(args, f.name, None)
    ]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)}")


def stage_file_values(path: str, cls: type, stage: str) -> dict[str, Any]:
    """The options of `selfsup lm STAGE` in a YAML file. A stage run's own config.yaml (which
    records `stage`) is accepted as it is, less its run folder, so it repeats that run."""
    from selfsup.core.config import read_config_file
    from selfsup.core.errors import SelfsupError

    values = read_config_file(path, {**field_types(cls), "stage": str})
    recorded = values.pop("stage", None)
    if recorded is not None:
        if recorded != stage:
            raise SelfsupError(
                f"--config {path}: options of a {recorded} run; use `selfsup lm {recorded}`"
            )
        values.pop("out", None)
        values.pop("resume", None)
    return values


class Deprecated(argparse.Action):
    """An old spelling of an option: sets the new option's value and prints one note line."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        deprecation(option_string or self.dest, self.new)
        setattr(namespace, self.dest, self.const if values in (None, []) else values)


QUIET = {"notes": False}  # True while a command line is parsed a second time


def deprecation(old: str, new: str) -> None:
    """One stderr line: `old` is deprecated; use `new` (an option), or `new` as said."""
    if not QUIET["notes"]:
        hint = f"use {new}" if new.startswith("--") else new
        print(f"selfsup: note: {old} is deprecated; {hint}", file=sys.stderr)


def add_deprecated(parser: Any, old: str, dest: str, new: str, **kwargs: Any) -> None:
    """`old` sets `dest` as the option `new` does, with a deprecation note (hidden in --help)."""
    parser.add_argument(old, dest=dest, action=Deprecated, new=new, default=argparse.SUPPRESS,
                        **kwargs)  # fmt: skip


def summary(lines: Sequence[str]) -> None:
    """The closing lines of a training command (what was written where, its headline metric,
    the next command)."""
    print("\n".join(line for line in lines if line))


def report_line(run: Path) -> str:
    """Write or refresh RUN/report.html (`selfsup report`); the summary line naming it ("" when
    it was not written, e.g. SELFSUP_REPORT=0)."""
    from selfsup.reporting import write_run_report

    page = write_run_report(run)
    return f"report: {page}" if page else ""
