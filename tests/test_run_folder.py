"""selfsup.core.run.RunFolder: the one run-folder lifecycle of every training command (claim,
begin, training, finished), checked on plain files: no torch, no training."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from selfsup.core import run as rundir
from selfsup.core.errors import NonFiniteLossError, SelfsupError
from selfsup.core.run import RunFolder


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def _finished(run: Path) -> Path:
    """A run folder as a run that checkpointed leaves it."""
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("method: simclr\n")
    (run / "command.txt").write_text("selfsup pretrain simclr\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    return run


def _remains(run: Path, *extra: str) -> Path:
    """What a start killed (kill -9) before its first checkpoint leaves."""
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "command.txt", "metrics.csv", *extra):
        (run / name).write_text("old\n")
    return run


def test_a_finished_run_is_never_reclaimed_without_resume(tmp_path: Path) -> None:
    run = _finished(tmp_path / "run")
    before = _files(run)
    with rundir.run_locks(), pytest.raises(SelfsupError) as caught:
        RunFolder.claim(run, resume=False)
    assert str(caught.value) == (
        f"run directory {run} already exists and holds checkpoints; pass --resume {run} to "
        "continue it or choose another --out"
    )
    assert _files(run) == before
    with rundir.run_locks():  # a run without --resume is told to choose another --out only
        with pytest.raises(SelfsupError, match="holds a finished run; choose another --out"):
            RunFolder.claim(run, resume=False, resumable=False)
        folder = RunFolder.claim(run, resume=True)  # --resume takes it
        folder.begin({"ignored": 1}, "selfsup pretrain --resume RUN")
    assert (run / "config.yaml").read_text() == "method: simclr\n"  # a resumed run keeps it
    assert (run / "command.txt").read_text().splitlines() == [
        "selfsup pretrain simclr",
        "selfsup pretrain --resume RUN",
    ]
    assert folder.last == run / "checkpoints" / "last.ckpt"


def test_claim_takes_the_run_lock_until_its_scope_ends(tmp_path: Path) -> None:
    run = tmp_path / "run"

    def locked() -> bool:  # another open file description of the lock: flock conflicts
        fd = os.open(rundir.lock_file(run), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    with rundir.run_locks():
        RunFolder.claim(run, resume=False)
        assert rundir.lock_file(run).read_text().strip() == str(os.getpid())
        assert locked()
    assert not rundir.lock_file(run).exists()
    _finished(run)
    with rundir.run_locks():
        RunFolder.claim(run, resume=True)
        assert locked()


def test_the_remains_of_a_killed_start_are_reused_and_nothing_else_is(tmp_path: Path) -> None:
    run = _remains(tmp_path / "run", "tokens.npy", ".config.yaml.x1.tmp")
    with rundir.run_locks():
        with pytest.raises(SelfsupError, match="nothing to resume; run the command without"):
            RunFolder.claim(run, resume=True, early={"tokens.npy"})
        with pytest.raises(SelfsupError, match="already exists and is not empty"):
            RunFolder.claim(run, resume=False)  # tokens.npy is not this kind's
        folder = RunFolder.claim(run, resume=False, early={"tokens.npy"})
        assert _files(run)["metrics.csv"] == b"old\n"  # claiming writes nothing
        folder.begin({"model": "gpt"}, "selfsup lm pretrain gpt")
    assert sorted(_files(run)) == ["command.txt", "config.yaml"]  # the remains are gone
    assert (run / "command.txt").read_text() == "selfsup lm pretrain gpt\n"
    assert folder.created

    mine = _remains(tmp_path / "mine", "notes.txt")  # a file selfsup did not write
    no_config = tmp_path / "no-config"
    (no_config / "checkpoints").mkdir(parents=True)
    (no_config / "metrics.csv").write_text("mine\n")
    for other in (mine, no_config):
        before = _files(other)
        with rundir.run_locks(), pytest.raises(SelfsupError, match="is not empty"):
            RunFolder.claim(other, resume=False)
        assert _files(other) == before


def test_a_failure_removes_only_a_created_folder_without_a_checkpoint(tmp_path: Path) -> None:
    with rundir.run_locks():
        fresh = RunFolder.claim(tmp_path / "fresh", resume=False)
        removed = r"nan at step 0; nothing is kept yet \(.* removed"
        with pytest.raises(SelfsupError, match=removed), fresh.training():
            fresh.begin({}, "cmd")
            raise NonFiniteLossError("the loss became nan at step 0")
        assert not fresh.path.exists()

        kept = RunFolder.claim(tmp_path / "kept", resume=False)
        last_good = "the last good checkpoint is .*last.ckpt$"
        with pytest.raises(SelfsupError, match=last_good), kept.training():
            kept.begin({}, "cmd")
            (kept.path / "checkpoints").mkdir()
            (kept.path / "checkpoints" / "last.ckpt").write_bytes(b"weights")
            raise NonFiniteLossError("the loss became nan at step 9")
        assert (kept.path / "checkpoints" / "last.ckpt").is_file()

        resumed = RunFolder.claim(kept.path, resume=True)
        (resumed.path / "checkpoints" / "last.ckpt").unlink()  # even so: not this call's
        with pytest.raises(RuntimeError), resumed.training():
            raise RuntimeError("later")
        assert resumed.path.is_dir()

        remains = RunFolder.claim(_remains(tmp_path / "remains"), resume=False)
        with pytest.raises(RuntimeError), remains.training():
            raise RuntimeError("before begin: the folder is not this call's yet")
        assert (remains.path / "metrics.csv").is_file()


class _Hint:
    """As engine.trainer.ResumeHint after Lightning noted a Ctrl-C."""

    interrupted = True

    def interruption(self, nothing_kept: str) -> KeyboardInterrupt:
        return KeyboardInterrupt(nothing_kept)


def test_ctrl_c_keeps_a_checkpoint_and_says_so_else_removes_the_start(tmp_path: Path) -> None:
    with rundir.run_locks():
        folder = RunFolder.claim(tmp_path / "run", resume=False)
        with pytest.raises(KeyboardInterrupt) as caught, folder.training(_Hint()):
            folder.begin({}, "cmd")
            raise SystemExit(1)  # what Lightning turns Ctrl-C into
        assert str(caught.value) == (
            f"nothing is kept yet ({folder.path} is removed): the same command starts afresh"
        )
        assert not folder.path.exists()
        with pytest.raises(SystemExit), folder.training(None):  # not a Ctrl-C: as it came
            raise SystemExit(3)


def test_resume_checks_and_later_processes(tmp_path: Path, monkeypatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with rundir.run_locks():
        with pytest.raises(SelfsupError, match="run directory .*nowhere does not exist"):
            RunFolder.claim(tmp_path / "nowhere", resume=True)
        with pytest.raises(SelfsupError, match="config.yaml is missing: .* not a selfsup run"):
            RunFolder.claim(empty, resume=True)
        (tmp_path / "file").write_text("mine")
        with pytest.raises(SelfsupError, match="is a file, not a folder"):
            RunFolder.claim(tmp_path / "file", resume=False)
    run = _finished(tmp_path / "run")
    before = _files(run)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process a multi-device run launched
    folder = RunFolder.claim(run, resume=False)  # the first process's folder: shared
    folder.begin({"x": 1}, "cmd")
    folder.finished(1.0, 10)
    assert _files(run) == before


def test_stage_metrics_and_checkpoints_round_trip(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path, checkpoint="checkpoints/last.pt")
    folder.append_metrics({"epoch": 1, "loss": 2.0})
    with pytest.raises(ValueError, match="columns"):
        folder.append_metrics({"iteration": 1})
    pytest.importorskip("torch")
    folder.save_checkpoint({"model": {}, "epoch": 3})
    assert folder.load_checkpoint(needs=("model",))["epoch"] == 3
    with pytest.raises(SelfsupError, match=r"last.pt: not a checkpoint \(no global_step in it\)"):
        folder.load_checkpoint(needs=("model", "global_step"))
