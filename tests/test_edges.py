"""Every failure a user can cause ends in one clear line (exit code 2), and nothing is lost.

Each test goes through the real entry point, `selfsup.cli.main.main(argv)`, and checks the exit
code, that stderr is a single line without a traceback, and what is left on disk.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError, one_line
from selfsup.image.methods.simclr import SimCLR

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = ["--data", "digits", "--limit", "256", "--batch-size", "64", "--epochs", "1"]


def fails_in_one_line(argv: list[str], capsys: pytest.CaptureFixture, match: str = "") -> str:
    """Run the CLI; assert exit code 2 and one stderr line (containing `match`); return it."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("selfsup: error: ") and match in err, err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("edges") / "run"
    assert main(["pretrain", "simclr", *QUICK, "--out", str(run)]) == 0
    return run


# ---- 1. one line instead of a traceback ----------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (["--lr", "-1"], "--lr must be positive"),
        (["--lr", "nan"], "--lr must be positive, got nan"),
        (["--weight-decay", "-1"], "--weight-decay must be zero or more"),
        (["--temperature", "inf"], "--temperature must be positive"),
        (["--crop-size", "2"], "--crop-size must be at least 4"),
        (["--mask-ratio", "0.5"], "unrecognized arguments: --mask-ratio"),  # mae's, not simclr's
        (["--warmup-epochs", "-0.5"], "--warmup-epochs must be zero or more"),
        (["--accelerator", "tpu"], "--accelerator 'tpu' is unknown"),
    ],
)
def test_bad_numbers_and_names_are_one_line_and_leave_no_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture, options: list[str], match: str
) -> None:
    run = tmp_path / "run"
    fails_in_one_line(["pretrain", "simclr", *QUICK, *options, "--out", str(run)], capsys, match)
    assert not run.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_this_machine_lacks_is_one_line(tmp_path: Path, capsys, finished_run: Path) -> None:
    run = tmp_path / "run"
    argv = ["pretrain", "simclr", *QUICK, "--accelerator", "gpu", "--out", str(run)]
    fails_in_one_line(argv, capsys, "no CUDA GPU")
    assert not run.exists()
    out = str(tmp_path / "e.npy")
    fails_in_one_line(["embed", str(finished_run), "--device", "cuda", "-o", out], capsys, "CUDA")
    fails_in_one_line(["evaluate", str(finished_run), "--device", "cuda:0"], capsys, "CUDA")


def test_bad_data_files_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros((300, 8, 8), np.uint8))
    fails_in_one_line(["pretrain", "simclr", "--data", f"npz:{plain}"], capsys, "single .npy")
    labels = tmp_path / "labels.npz"  # -3 is no label and no class when the file names none
    np.savez(labels, x=np.zeros((300, 8, 8), np.uint8), y=np.full(300, -3))
    fails_in_one_line(["pretrain", "simclr", "--data", f"npz:{labels}"], capsys, "label -3")
    run = tmp_path / "run"
    fails_in_one_line(
        ["pretrain", "simclr", "--data", f"npz:{labels}", "--out", str(run)], capsys, "label -3"
    )
    assert not run.exists()


def test_outputs_that_cannot_be_written_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, finished_run: Path
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    argv = ["pretrain", "simclr", *QUICK]
    fails_in_one_line([*argv, "--out", str(a_file)], capsys, "is a file")
    fails_in_one_line([*argv, "--out", str(a_file / "run")], capsys, "cannot create the run folder")
    assert a_file.read_text() == "mine"
    out = str(a_file / "emb.npy")
    fails_in_one_line(["embed", str(finished_run), "--limit", "8", "-o", out], capsys, "a_file")
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    fails_in_one_line(
        ["augment-preview", str(image), "-o", str(a_file / "g.png")], capsys, "a_file"
    )


def test_batch_size_zero_is_one_line(capsys: pytest.CaptureFixture, finished_run: Path) -> None:
    run = str(finished_run)
    fails_in_one_line(["evaluate", run, "--batch-size", "0"], capsys, "--batch-size")
    fails_in_one_line(["embed", run, "--batch-size", "0", "-o", "x.npy"], capsys, "--batch-size")
    fails_in_one_line(["zero-shot", run, "--batch-size", "-1"], capsys, "--batch-size")


def _checkpoint_variants(good: Path, folder: Path) -> dict[str, Path]:
    data = good.read_bytes()
    variants = {
        "truncated": data[: len(data) // 2],
        "garbage": b"not a checkpoint at all" * 100,
        "empty": b"",
    }
    paths = {}
    for name, content in variants.items():
        paths[name] = folder / f"{name}.ckpt"
        paths[name].write_bytes(content)
    # A pickle with a Python object weights-only loading refuses (it could run code).
    paths["pickled"] = folder / "pickled.ckpt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, paths["pickled"])
    paths["foreign"] = folder / "foreign.ckpt"  # loads, but holds another model's weights
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "epoch": 0}, paths["foreign"])
    return paths


@pytest.mark.parametrize("variant", ["truncated", "garbage", "empty", "pickled", "foreign"])
def test_a_bad_checkpoint_stops_resume_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture, finished_run: Path, variant: str
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    last = run / "checkpoints" / "last.ckpt"
    bad = _checkpoint_variants(last, tmp_path)[variant]
    shutil.copy(bad, last)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    expected = {"pickled": "weights-only", "foreign": "does not fit"}.get(variant, "last.ckpt")
    fails_in_one_line(["pretrain", "--resume", str(run), "--epochs", "2"], capsys, expected)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # nothing written: not the command, not metrics.csv


# ---- 2. resume keeps the history -----------------------------------------------------------


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _worker(mode: str, run: Path) -> subprocess.CompletedProcess:
    worker = Path(__file__).with_name("_resume_worker.py")
    return subprocess.run(
        [sys.executable, str(worker), mode, str(run)], capture_output=True, text=True, timeout=600
    )


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    with ThreadPoolExecutor(2) as pool:  # two independent processes: side by side
        full, done = pool.map(_worker, ("full", "kill"), (straight, killed))
    assert full.returncode == 0, full.stderr[-2000:]
    assert done.returncode == -9, done.stderr[-2000:]
    steps_on_disk = {int(r["step"]) for r in _rows(killed / "metrics.csv")}
    assert max(steps_on_disk) >= 5  # rows past the checkpoint at step 4 did reach the disk
    done = _worker("resume", killed)
    assert done.returncode == 0, done.stderr[-2000:]

    a, b = _rows(straight / "metrics.csv"), _rows(killed / "metrics.csv")
    assert [r["step"] for r in a] == [r["step"] for r in b]  # none lost, none duplicated
    assert len(a) == 3 * 4 + 3  # a row per step and a validation row per epoch
    for row_a, row_b in zip(a, b, strict=True):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            if row_a[key] or row_b[key]:
                assert float(row_a[key]) == pytest.approx(float(row_b[key]), rel=1e-4, abs=1e-6)
    wa = torch.load(straight / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(killed / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)
    commands = (killed / "command.txt").read_text().splitlines()
    assert len(commands) == 2 and "resume=" in commands[1]


def test_resuming_a_finished_run_keeps_its_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture, finished_run: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    rows = _rows(run / "metrics.csv")
    assert rows and main(["pretrain", "--resume", str(run)]) == 0
    assert _rows(run / "metrics.csv") == rows
    assert main(["pretrain", "--resume", str(run), "--epochs", "2"]) == 0  # extend it
    extended = _rows(run / "metrics.csv")
    assert extended[: len(rows)] == rows and len(extended) > len(rows)
    assert {r["epoch"] for r in extended} == {"0", "1"}


# ---- 3. resume as documented ---------------------------------------------------------------


def test_resume_needs_no_method_and_refuses_another(
    tmp_path: Path, capsys: pytest.CaptureFixture, finished_run: Path
) -> None:
    run = str(finished_run)
    fails_in_one_line(["pretrain", "rotation", "--resume", run], capsys, "trains simclr")
    fails_in_one_line(["pretrain", "--resume", run, "--lr", "0.5"], capsys, "--lr 0.5 differs")
    fails_in_one_line(["pretrain"], capsys, "METHOD is required")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails_in_one_line(["pretrain", "--resume", str(empty)], capsys, "config.yaml is missing")


def test_ctrl_c_exits_130_with_a_hint_that_works(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = SimCLR.training_step

    def interrupted(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise KeyboardInterrupt
        return step(self, batch, batch_idx)

    monkeypatch.setattr(SimCLR, "training_step", interrupted)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["pretrain", "simclr", *QUICK, "--epochs", "2", "--out", str(run)]) == 130
    err = capsys.readouterr().err
    hint = err.strip().splitlines()[-1]
    assert hint.endswith(f"continue with: selfsup pretrain --resume {run}"), err
    monkeypatch.setattr(SimCLR, "training_step", step)
    argv = hint.split("continue with: selfsup ")[1].split()
    assert main(argv) == 0
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1


# ---- 4. no half-written folder blocks a retry ----------------------------------------------


def test_a_run_that_fails_before_its_first_checkpoint_can_be_retried(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    loss = SimCLR.pretext_loss

    def nan_at_once(self, x, y, g):
        value, features = loss(self, x, y, g)
        return value * float("nan"), features

    monkeypatch.setattr(SimCLR, "pretext_loss", nan_at_once)
    run = tmp_path / "run"
    argv = ["pretrain", "simclr", *QUICK, "--out", str(run)]
    fails_in_one_line(argv, capsys, "loss became nan at step 0")
    assert not run.exists()  # removed: nothing half-written
    monkeypatch.setattr(SimCLR, "pretext_loss", loss)

    # The remains of a run killed before its first checkpoint (kill -9 leaves them) are reused.
    run.mkdir()
    (run / "config.yaml").write_text("method: simclr\n")
    (run / "command.txt").write_text("selfsup pretrain simclr\n")
    (run / "checkpoints").mkdir()
    assert main(argv) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "command.txt").read_text().count("selfsup") == 1
    # ... but never a folder with checkpoints, nor one holding files selfsup did not write.
    fails_in_one_line(argv, capsys, "holds checkpoints; pass --resume")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own config")
    (mine / "notes.txt").write_text("mine")
    fails_in_one_line(["pretrain", "simclr", *QUICK, "--out", str(mine)], capsys, "not empty")
    assert (mine / "notes.txt").read_text() == "mine"


# ---- 5. argparse errors are one line -------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["pretrain", "simclr", "--bogus"], "see `selfsup pretrain simclr --help`"),
        (["pretrain", "simclr", "--temp", "0.2"], "see `selfsup pretrain simclr --help`"),
        (["pretrain", "nomethod"], "see `selfsup pretrain --help`"),
        (["evaluate", "runs/x", "--fraction", "0.1"], "see `selfsup evaluate --help`"),
        (["evaluate"], "see `selfsup evaluate --help`"),
        (["nocommand"], "see `selfsup --help`"),
        (["embed", "runs/x", "--batch-size", "many", "-o", "e.npy"], "see `selfsup embed --help`"),
    ],
)
def test_usage_errors_are_one_line_with_a_help_hint(
    argv: list[str], hint: str, capsys: pytest.CaptureFixture
) -> None:
    fails_in_one_line(argv, capsys, hint)


class _Corrupt(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 2:
            raise SelfsupError("photos/b.png: cannot decode image (truncated)")
        return torch.zeros(1)


def test_an_error_in_a_dataloader_worker_is_reported_as_its_own_one_line() -> None:
    loader = torch.utils.data.DataLoader(_Corrupt(), batch_size=1, num_workers=1)
    with pytest.raises(SelfsupError) as caught:
        list(loader)
    assert "Traceback" in str(caught.value)  # what torch hands the main process
    assert one_line(caught.value) == "photos/b.png: cannot decode image (truncated)"
    assert one_line(SelfsupError("a\n  b")) == "a b"
