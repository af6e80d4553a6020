"""RUN/metrics.csv that survives `--resume`: Lightning's CSVLogger deletes the file it finds.

A resumed run keeps the rows logged before its checkpoint and drops the rows an interrupted run
logged after it, so an interrupted-then-resumed run ends with the same rows as an uninterrupted
one.
Rows are flushed to disk with every checkpoint, so a run killed without warning (kill -9) still
has the rows its last checkpoint covers.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from selfsup.core.run import atomic_write_text

METRICS = "metrics.csv"


def resumed_step(checkpoint: dict[str, Any]) -> int:
    """The optimiser steps G a Lightning checkpoint had taken. A row logged at the end of
    optimiser step k carries step k - 1, so the rows a checkpoint covers are those below G,
    whether it was saved at an epoch's end or by a validation within one."""
    return int(checkpoint.get("global_step", 0))


def keep_rows_before(path: Path, step: int) -> list[str]:
    """Rewrite the CSV at `path` with only its rows logged before `step`, each once (of a row
    repeated, as two writers at once left, the latest copy); returns its header."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list({_key(row): row for row in reader if _step(row) < step}.values())
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())
    return header


def _key(row: dict[str, str]) -> tuple[str, ...]:
    """A row's step and the metrics it holds: Lightning logs a step's epoch-level and
    step-level metrics in separate rows."""
    return (row.get("step") or "", *(k for k, v in row.items() if v and k != "step"))


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return math.nan  # a damaged row: NaN < step is False, so it is dropped


class _KeepingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_before: int | None) -> None:
        self.keep_before = keep_before
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.keep_before is None or not path.is_file():
            super()._check_log_dir_exists()  # a fresh run: an old file goes (Lightning's rule)
            return
        self.metrics_keys = keep_rows_before(path, self.keep_before)


class RunCSVLogger(CSVLogger):
    """CSVLogger writing RUN/metrics.csv; `keep_before` (a resumed run's checkpoint step) keeps
    the rows logged before that step instead of deleting the file. `drop` names columns not to
    write (a run counted in steps has no meaningful `epoch`: Lightning restarts its count on
    resume)."""

    def __init__(
        self, run: Path, keep_before: int | None = None, drop: tuple[str, ...] = (), **kwargs: Any
    ) -> None:
        super().__init__(save_dir=run, name="", version="", **kwargs)
        self.keep_before, self.drop = keep_before, drop

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k not in self.drop}, step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self.keep_before)
        return self._experiment


class FlushMetricsWithCheckpoints(Callback):
    """Writes the logged rows to disk whenever a checkpoint is saved: what a checkpoint covers
    is on disk even if the process is then killed."""

    def on_save_checkpoint(self, trainer: L.Trainer, module: Any, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()
