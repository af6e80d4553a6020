"""What every stage after pretraining is to the command line: its options, its entry point and
its closing lines (torch-free; the CLI adds the report line between them)."""

from __future__ import annotations

import csv
import shlex
from importlib import import_module
from pathlib import Path
from typing import Any, ClassVar


class Stage:
    """A stage of `selfsup lm`: `Options` (a dataclass), `run(options, command)` writing a run
    folder (None when it writes none), `summary(run)` the lines around its report line. `help`,
    `description` and `entry` must be string literals (read from the source by `ast`)."""

    Options: ClassVar[type]
    help: ClassVar[str]
    description: ClassVar[str]
    entry: ClassVar[str]  # the function of the stage's module that runs it

    @classmethod
    def run(cls, options: Any, command: str | None = None) -> Path | None:
        """`entry(options, command)`, looked up when called (a test may replace it)."""
        return getattr(import_module(cls.__module__), cls.entry)(options, command)

    @staticmethod
    def summary(run: Path) -> tuple[list[str], list[str]]:
        """(the lines before the report line, the lines after it)."""
        return [f"run directory: {run}/"], []


def last_row(path: Path) -> dict[str, str]:
    """The last row of a metrics.csv (empty if there is none)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def metric_line(
    row: dict[str, str], names: tuple[str, ...], step: str = "epoch", file: str = "metrics.csv"
) -> str:
    """`val loss 1.234, ... after epoch 3 (metrics.csv)` from a metrics row ("" if none)."""
    shown = [f"{n.replace('_', ' ')} {float(row[n]):.4g}" for n in names if row.get(n)]
    where = f" after {step} {row[step]}" if row.get(step) else ""
    return f"{', '.join(shown)}{where} ({file})" if shown else ""


def epoch_summary(
    run: Path, written: str, names: tuple[str, ...], after: str
) -> tuple[list[str], list[str]]:
    """The closing lines of a stage that trains in epochs (sft, reward, dpo)."""
    metric = metric_line(last_row(run / "metrics.csv"), names)
    return [f"run directory: {run}/ ({written})", metric], [f"next: {after}"]


class EpochStage(Stage):
    """A stage that trains on a file in epochs (`posttrain.fit_stage`): its closing lines name
    what it wrote, the last row's `shown` metrics and the command `after` it ({run}: the run)."""

    written: ClassVar[str] = "hf/ the Hugging Face model, metrics.csv, checkpoint"
    shown: ClassVar[tuple[str, ...]] = ("val_loss", "train_loss")
    after: ClassVar[str] = "selfsup lm chat {run}"

    @classmethod
    def summary(cls, run: Path) -> tuple[list[str], list[str]]:  # type: ignore[override]
        after = cls.after.format(run=shlex.quote(str(run)))
        return epoch_summary(run, cls.written, cls.shown, after)


def policy_summary(run: Path) -> tuple[list[str], list[str]]:
    """The closing lines of a stage that optimises a policy by sampling (rlhf, grpo)."""
    last = last_row(run / "eval.csv")
    return [
        f"run directory: {run}/ (hf/ the policy, iterNNNN/ the evaluated ones, metrics.csv)",
        "held-out " + metric_line(last, ("proxy", "gold", "kl"), "iteration", "eval.csv"),
    ], [f"next: selfsup lm chat {shlex.quote(str(run))}"]
