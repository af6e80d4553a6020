"""Lightning's progress bars on stderr, where every other selfsup bar is: Lightning's
`TQDMProgressBar` writes to stdout, between the results a script may read from it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


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
