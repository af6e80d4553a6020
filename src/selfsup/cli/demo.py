"""`selfsup demo`: SimCLR on scikit-learn's digits, then the few-label table, offline."""

from __future__ import annotations

import shutil
from pathlib import Path

from selfsup.cli.common import print_results
from selfsup.image.config import PretrainConfig

DEMO = PretrainConfig(
    method="simclr",
    data="digits",
    backbone="convnet",
    batch_size=256,
    epochs=30,
    optimizer="adamw",
    lr=2e-3,
    recipe="digits",
    options={"temperature": 0.2},  # SimCLR's own option
)


def demo(out: str = "runs/demo", epochs: int | None = None) -> dict:
    """Pretrain, evaluate and print; a fresh run directory each time (the old one is replaced)."""
    import torch

    from selfsup.api import evaluate, pretrain

    # digits are 8x8: one thread is as fast, and on a busy machine two threads waiting on each
    # other made the demo's small steps ~15x slower (measured on the shared 2-core machine)
    torch.set_num_threads(1)
    run = Path(out)
    if (run / "config.yaml").is_file():
        shutil.rmtree(run)
    print(f"selfsup demo: SimCLR on scikit-learn digits (1,437 train / 360 test images) -> {run}")
    pretrain(DEMO, out=str(run), epochs=epochs or DEMO.epochs, report=False)  # evaluate writes it
    # the supervised baseline trains with the run's recipe ("digits"): seconds on 8x8 digits
    results = evaluate(run, baselines="raw,pca,random,supervised")
    print_results(results)
    return results
