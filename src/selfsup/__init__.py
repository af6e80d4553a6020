"""selfsup: self-supervised representation learning, from pretext tasks to few-label transfer.

import selfsup
run = selfsup.pretrain(method="simclr", data="digits", recipe="digits", epochs=30)
encoder = selfsup.load(run)              # images -> features
results = selfsup.evaluate(run)          # linear probe, kNN, k-means, few-label table
selfsup.report([run], "report.html")     # one self-contained HTML page of runs side by side
sft = selfsup.align("sft", init="base-run", data="chat.jsonl", out="runs/sft")  # + its report
"""

from importlib import import_module
from typing import Any

from selfsup.core import __version__ as __version__

# Imported on first use, so that `selfsup --help` does not pay for torch and Lightning.
_EXPORTS = {
    "pretrain": "selfsup.api",
    "evaluate": "selfsup.api",
    "align": "selfsup.api",
    "embed": "selfsup.image.runs",
    "load": "selfsup.image.runs",
    "report": "selfsup.reporting",
    "write_run_report": "selfsup.reporting",
    "PretrainConfig": "selfsup.image.config",
    "EvalConfig": "selfsup.image.config",
    "SelfsupError": "selfsup.core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'selfsup' has no attribute {name!r}")
