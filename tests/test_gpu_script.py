"""benchmarks/gpu.sh, prepared for a lent GPU, runs end to end in its CPU smoke mode (issue 36)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not (DATA / "cifar10").is_dir(), reason="needs ../shared/data/cifar10")
def test_gpu_script_smoke_mode_runs_every_step(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "SELFSUP_DATA": str(DATA)}
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "smoke", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    throughput = (tmp_path / "throughput.txt").read_text()
    assert re.search(r"convnet\s+selfsup\s+[\d.]+", throughput), throughput
    # the FLOP table: a SimCLR step row whose share of the peak is a percentage
    mfu = (tmp_path / "mfu.txt").read_text()
    assert re.search(r"\| simclr \| convnet \| 32 \| 32 \| step \|.*\| [\d.]+% \|", mfu), mfu
    assert (tmp_path / "simclr" / "encoder.safetensors").is_file()
    assert "s of pretraining wall time" in (tmp_path / "pretrain-simclr.txt").read_text()
    # the kNN probe (lightly's k=200) evaluated the pretrained encoder: an accuracy ± its spread
    evaluation = (tmp_path / "evaluate-simclr.txt").read_text()
    assert "error" not in evaluation, evaluation
    assert len(re.findall(r"\d+\.\d+", evaluation)) >= 2, evaluation
