"""Helpers of the `selfsup lm` parsers: options mirrored from the dataclasses of
`selfsup.lm.options` and from the stages' Options as the ALIGN registry reads them (required
ones marked so), deprecated spellings, run summaries."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfsup.cli.common import about
from selfsup.core.config import add_option, field_types, type_of
from selfsup.core.registry import OptionSpec


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


def add_stage_arguments(parser: Any, specs: Sequence[OptionSpec], file_flags: bool = False) -> None:
    """A stage's Options fields (`ALIGN.options`) as `--field-name` options, the shared ones
    (`selfsup.lm.options.LISTED_LAST`) last. A `required=True` field is checked after --config is
    read (`check_required`), or by argparse itself with `file_flags` (its --config gives flags);
    `nargs`/`const` pass to argparse, `deprecated` maps old no-value spellings to their hints."""
    from selfsup.lm.options import LISTED_LAST

    last = {name: i for i, name in enumerate(LISTED_LAST)}
    for s in sorted(specs, key=lambda s: last.get(s.name, -1)):
        if not s.metadata.get("cli", True):
            continue
        flag, tp = "--" + s.name.replace("_", "-"), type_of(s.type)
        metavar = "RUN" if s.name == "resume" else None
        if s.metadata.get("required"):
            kw: dict[str, Any] = {"required": True} if file_flags else {"default": ""}
            suffix = "" if file_flags else " (required)"
            parser.add_argument(flag, dest=s.name, type=tp, help=s.help + suffix, **kw)
        elif s.metadata.get("repeat"):  # given several times: a comma list (grpo --reward-fn)
            parser.add_argument(flag, dest=s.name, action=Joined, default=s.default, help=s.help)
        elif "nargs" in s.metadata:
            nargs, const = s.metadata["nargs"], s.metadata.get("const")
            parser.add_argument(flag, dest=s.name, metavar=metavar, nargs=nargs, const=const,
                                default=s.default, help=s.help)  # fmt: skip
        else:
            add_option(parser, s.name, tp, s.default if s.default != "" else None, s.help)
            parser._actions[-1].default = s.default
            parser._actions[-1].metavar = metavar
        for old, hint in s.metadata.get("deprecated", {}).items():
            add_deprecated(parser, old, s.name, hint, nargs=0)


def check_required(args: argparse.Namespace, specs: Sequence[OptionSpec]) -> None:
    """argparse's error for the required options of a stage that neither the command line nor
    the --config file gave."""
    from selfsup.cli.common import UsageError

    missing = [
        "--" + s.name.replace("_", "-")
        for s in specs
        if s.metadata.get("required") and not getattr(args, s.name, None)
    ]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)}")


def stage_file_values(path: str, specs: Sequence[OptionSpec], stage: str) -> dict[str, Any]:
    """The options of `selfsup lm STAGE` in a YAML file. A stage run's own config.yaml (which
    records `stage`) is accepted as it is, less its run folder, so it repeats that run."""
    from selfsup.core.config import read_config_file
    from selfsup.core.errors import SelfsupError

    types = {s.name: type_of(s.type) for s in specs}
    values = read_config_file(path, {**types, "stage": str})
    recorded = values.pop("stage", None)
    if recorded is not None:
        if recorded != stage:
            raise SelfsupError(
                f"--config {path}: options of a {recorded} run; use `selfsup lm {recorded}`"
            )
        values.pop("out", None)
        values.pop("resume", None)
    return values


def add_command(sub: Any, parents: list, name: str, add: Any, handler: Any) -> Any:
    """`selfsup lm NAME`: its sub-parser (the shared flags as `parents`; its help and
    description from `add`'s docstring, as `about` reads it), run by `handler`."""
    parser = sub.add_parser(name, parents=parents, **about(add))
    parser.set_defaults(handler=handler)
    return parser


class Joined(argparse.Action):
    """A repeatable string option kept as one comma list; the first use on a command line
    replaces the default (or a --config file's value), the next ones are added to it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        old = getattr(namespace, self.dest, None)
        joined = values if old in (None, "", self.default) else f"{old},{values}"
        setattr(namespace, self.dest, joined)


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
