"""One writer per run folder (issue 34): every command that writes into a run takes its lock; a
second writer is refused in one line naming the holder's PID; a holder killed with -9 leaves a
lock that the next writer takes over; the processes a multi-process run launches are not
refused; metrics.csv never holds a step twice."""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from selfsup.core import run as rundir
from selfsup.core.errors import SelfsupError

# Holds the lock of every run folder named on its command line until it is killed.
HOLDER = """
import sys, time
from selfsup.core.run import lock_run
for run in sys.argv[1:]:
    lock_run(run)
print("locked", flush=True)
time.sleep(120)
"""
# Tries to lock a run folder: exit 0 when it got the lock, 2 and the error line when refused.
TRY = """
import sys
from selfsup.core.errors import SelfsupError
from selfsup.core.run import lock_run
try:
    lock_run(sys.argv[1])
except SelfsupError as e:
    print(e)
    sys.exit(2)
"""


def _hold(*runs: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *map(str, runs)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def _try(run: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", TRY, str(run)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


def test_a_second_process_is_refused_in_one_line_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with rundir.run_locked(run):
        refused = _try(run)
        assert refused.returncode == 2
        assert refused.stdout.strip().splitlines() == [
            f"{run} is in use by another selfsup process (PID {os.getpid()}, lock "
            f"{rundir.lock_file(run)}); wait for it to end or stop it, then try again"
        ]
        with rundir.run_locked(run):  # the holder itself may take it again
            pass
        assert _try(run).returncode == 2  # ... and still holds it
    assert not rundir.lock_file(run).exists()  # released at the end of the block, file removed
    assert _try(run).returncode == 0


def test_a_holder_killed_with_sigkill_leaves_a_lock_that_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        with pytest.raises(
            SelfsupError, match=f"in use by another selfsup process \\(PID {holder.pid},"
        ):
            rundir.lock_run(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert rundir.lock_file(run).read_text().strip() == str(holder.pid)  # stale: left behind
    with rundir.run_locked(run):
        assert rundir.lock_file(run).read_text().strip() == str(os.getpid())
        assert _try(run).returncode == 2


def test_the_processes_a_multi_process_run_launches_are_not_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with rundir.run_locked(run):
        for env in ({"LOCAL_RANK": "1"}, {"RANK": "3"}, {"NODE_RANK": "1"}):
            assert _try(run, **env).returncode == 0, env
        assert _try(run, LOCAL_RANK="0", RANK="0").returncode == 2  # torchrun's first process


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """A folder of run folders, each locked by another live process; yields (folder, its PID)."""
    root = tmp_path_factory.mktemp("held")
    runs = [root / name for name in ("image", "eval", "report", "lm", "sft", "best")]
    for run in runs:
        run.mkdir()
        (run / "config.yaml").write_text("encoder: {}\n")  # as a run that stopped early
        (run / "command.txt").write_text("the first writer\n")
    holder = _hold(*runs)
    yield root, holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def _refused(held: tuple[Path, int], name: str, write) -> None:  # noqa: ANN001
    root, pid = held
    run = root / name
    with pytest.raises(
        SelfsupError, match=f"^{run} is in use by another selfsup process \\(PID {pid},"
    ):
        write(run)
    assert sorted(p.name for p in run.iterdir()) == ["command.txt", "config.yaml"]
    assert (run / "command.txt").read_text() == "the first writer\n"  # untouched


def test_every_writer_of_a_run_folder_takes_its_lock(held: tuple[Path, int]) -> None:
    import selfsup
    from selfsup.lm.alignment.best_of_n import keep_table as _keep_best_of_n
    from selfsup.lm.options import TuneConfig
    from selfsup.lm.training.posttrain import fit_stage
    from selfsup.lm.training.pretrain import pretrain_lm
    from selfsup.reporting import report

    # a fresh `pretrain --out RUN` would clear this early-stopped folder and reuse it
    _refused(held, "image", lambda r: selfsup.pretrain(data="digits", epochs=1, out=str(r)))
    _refused(held, "eval", lambda r: selfsup.evaluate(r))
    _refused(held, "report", lambda r: report(r))
    _refused(held, "lm", lambda r: pretrain_lm(model="gpt", data="corpus.txt", out=str(r)))
    sft = dict(init="base", data="sft.jsonl")  # refused before the model is used
    _refused(held, "sft", lambda r: fit_stage("sft", TuneConfig(**sft, out=str(r)), *[None] * 6))
    args = argparse.Namespace(n="1")
    _refused(held, "best", lambda r: _keep_best_of_n(r, [], args, "selfsup lm best-of-n"))


def test_resumed_metrics_hold_each_step_once_keeping_the_latest(tmp_path: Path) -> None:
    from selfsup.engine.metrics_log import keep_rows_before

    path = tmp_path / "metrics.csv"
    header = ["epoch", "step", "test/probe_acc", "train/loss"]
    first = [["0", "3", "", "2.0"], ["0", "3", "0.5", ""], ["1", "7", "", "1.5"]]
    again = [["0", "3", "", "1.9"], ["0", "3", "0.6", ""], ["1", "7", "", "1.4"]]
    later = [["2", "11", "", "1.0"]]
    # two writers at once, as before the lock: rows repeated, then one past the checkpoint
    path.write_text("\n".join(",".join(r) for r in [header, *first, *again, *later]) + "\n")
    assert keep_rows_before(path, 8) == header
    with open(path, newline="") as f:
        assert [list(r.values()) for r in csv.DictReader(f)] == again


def test_a_stage_epoch_logged_again_after_resume_replaces_its_row(tmp_path: Path) -> None:
    folder = rundir.RunFolder(tmp_path)
    for row in [(1, 2.0), (2, 1.5), (2, 1.4), (3, 1.0)]:  # killed after epoch 2's row, resumed
        folder.append_metrics({"epoch": row[0], "train_loss": row[1]})
    folder.append_metrics({"epoch": 3, "train_loss": 0.9})
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert list(csv.reader(f)) == [
            ["epoch", "train_loss"],
            ["1", "2.0"],
            ["2", "1.4"],
            ["3", "0.9"],
        ]
