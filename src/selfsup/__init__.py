"""selfsup: self-supervised representation learning, from pretext tasks to few-label transfer.

import selfsup
run = selfsup.pretrain(method="simclr", data="digits", recipe="digits", epochs=30)
encoder = selfsup.load(run)              # images -> features
results = selfsup.evaluate(run)          # linear probe, kNN, k-means, few-label table
selfsup.report([run], "report.html")     # one self-contained HTML page of runs side by side
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Imported on first use, so that `selfsup --help` does not pay for torch and Lightning.
_EXPORTS = {
    "pretrain": "selfsup.image.train",
    "evaluate": "selfsup.api",
    "embed": "selfsup.api",
    "load": "selfsup.api",
    "report": "selfsup.reporting",
    "write_run_report": "selfsup.reporting",
    "PretrainConfig": "selfsup.core.config",
    "EvalConfig": "selfsup.core.config",
    "SelfsupError": "selfsup.core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'selfsup' has no attribute {name!r}")
