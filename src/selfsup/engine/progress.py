"""Progress on stderr, where every selfsup bar is: Lightning's bars (its `TQDMProgressBar`
writes to stdout, between the results a script may read from it) and how times to go are said."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


def show_bars(progress: bool | None) -> bool:
    """`--progress/--no-progress`, or (None) bars only where stderr is a terminal."""
    return progress if progress is not None else sys.stderr.isatty()


def duration(seconds: float) -> str:
    """A time to go, as progress lines say it: '45 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def _on_stderr(make: Callable[[], Any]) -> Any:
    with contextlib.redirect_stdout(sys.stderr):  # Lightning passes file=sys.stdout
        return make()


class StderrProgressBar(TQDMProgressBar):
    """`TQDMProgressBar` whose bars go to stderr."""

    def init_sanity_tqdm(self) -> Any:
        return _on_stderr(super().init_sanity_tqdm)

    def init_train_tqdm(self) -> Any:
        return _on_stderr(super().init_train_tqdm)

    def init_predict_tqdm(self) -> Any:
        return _on_stderr(super().init_predict_tqdm)

    def init_validation_tqdm(self) -> Any:
        return _on_stderr(super().init_validation_tqdm)

    def init_test_tqdm(self) -> Any:
        return _on_stderr(super().init_test_tqdm)
