"""Options and option files checked at the edge: one line, before torch loads where it can."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

from selfsup.cli.main import main
from selfsup.core.config import PRECISIONS, SEED_MAX
from selfsup.core.errors import SelfsupError


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line `selfsup ARGV` prints (exit code 2)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfsup: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--precision", "banana"], "--precision 'banana' is unknown; expected one of 64-true"),
        (["--seed", "99999999999999999999"], f"--seed must be a whole number from 0 to {SEED_MAX}"),
        (["--seed", "-1"], f"--seed must be a whole number from 0 to {SEED_MAX}, got -1"),
        (["--seed", str(SEED_MAX + 1)], f"from 0 to {SEED_MAX}, got {SEED_MAX + 1}"),
    ],
)
def test_precision_and_seed_outside_what_lightning_and_numpy_take_are_one_line(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert expected in _error(["pretrain", "simclr", *argv], capsys)


def test_seed_of_other_commands_and_of_config_files_is_checked_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _error(["select", str(tmp_path), "--budget", "5", "--seed", "-3"], capsys)
    assert f"argument --seed: expected a whole number from 0 to {SEED_MAX}, got '-3'" in err
    config = tmp_path / "c.yaml"
    config.write_text(f"seed: {2**64}\n")
    err = _error(["pretrain", "simclr", "--config", str(config)], capsys)
    assert f"--seed must be a whole number from 0 to {SEED_MAX}, got {2**64}" in err


def test_precisions_are_the_values_lightning_accepts() -> None:
    from lightning.fabric.connector import _PRECISION_INPUT

    accepted = {
        str(v) for literal in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(literal)
    }
    assert set(PRECISIONS) == accepted


def test_bad_options_are_refused_before_torch_is_imported() -> None:
    """`--lr -1` took 11 s to refuse under load: the options are checked before
    `selfsup.image.train` (torch, Lightning) is imported, a method's own ones from its file's
    declarations."""
    code = (
        "import sys\n"
        "from selfsup.cli.main import main\n"
        "for args in (['--lr', '-1'], ['--precision', 'banana'], ['--seed', '-1'],\n"
        "             ['--temperature', '-1'], ['--epochs', '0']):\n"
        "    assert main(['pretrain', 'simclr', *args]) == 2\n"
        "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "selfsup: error: --lr must be positive, got -1.0",
        lines[1],
        f"selfsup: error: --seed must be a whole number from 0 to {SEED_MAX}, got -1",
        "selfsup: error: --temperature must be positive, got -1.0",
        "selfsup: error: --epochs must be at least 1, got 0",
    ]
    assert lines[1].startswith("selfsup: error: --precision 'banana' is unknown")


def test_devices_beyond_the_machine_are_refused_before_lightning_starts_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--devices 64 --accelerator cpu` started 64 processes and hung for minutes."""
    import selfsup.image.train
    from selfsup.engine.distributed import cpu_cores

    def no_trainer(*args: object, **kwargs: object) -> None:
        raise AssertionError("Lightning was started")

    monkeypatch.setattr(selfsup.image.train.L, "Trainer", no_trainer)
    cores = cpu_cores()
    out = tmp_path / "run"
    for devices in (str(cores + 1), "64", "-1", "0,1"):
        err = _error(
            ["pretrain", "simclr", "--accelerator", "cpu", "--devices", devices, "--out", str(out)],
            capsys,
        )
        assert (
            f"--devices {devices} --accelerator cpu: this machine has {cores} CPU core(s); " in err
        )
        assert f"a CPU run takes --devices 1 to {cores} (one process each) or auto" in err
    assert not out.exists()


def test_cuda_devices_are_checked_against_the_gpus_there(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from selfsup.engine.distributed import check_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for devices in ("1", "2", "-1", "0,1", "1,", "auto"):
        check_devices("gpu", devices)
    for devices, expected in (("3", "has 2 CUDA GPU(s)"), ("0,2", "has 2"), ("0", "expected")):
        with pytest.raises(SelfsupError, match=re.escape(expected)):
            check_devices("auto", devices)


@pytest.mark.parametrize(
    "text",
    [
        "epochs: " + "[" * 5000 + "]" * 5000 + "\n",
        "epochs:\n" + "- " * 5000 + "1\n",
        "epochs: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
    ],
    ids=["flow-list", "block-list", "flow-mapping"],
)
@pytest.mark.parametrize("command", [["pretrain", "simclr"], ["export", "RUN"]])
def test_a_deeply_nested_config_file_is_one_line(
    text: str, command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """pretrain's reader (config.read_config_file) and every other command's (option_files)."""
    config = tmp_path / "deep.yaml"
    config.write_text(text)
    err = _error([*command, "--config", str(config)], capsys)
    assert f"--config {config}:" in err and "too deeply nested (over 50 levels)" in err


@pytest.mark.parametrize(
    ("command", "text", "expected"),
    [
        (["pretrain", "simclr"], "epochs: 1\nlr: 0.1\nepochs: 0\n", ":3: 'epochs' is given twice"),
        (["pretrain", "simclr"], "batch-size: 8\nbatch_size: 0\n", "'batch-size' and 'batch_size'"),
        (["export", "RUN"], "format: onnx\n\nformat: pickle\n", ":3: 'format' is given twice"),
        (["export", "RUN"], "x: {a: 1, a: 2}\n", ":1: 'a' is given twice (first on line 1)"),
    ],
)
def test_a_key_given_twice_in_a_config_file_is_refused_naming_its_line(
    command: list[str],
    text: str,
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "dup.yaml"
    config.write_text(text)
    err = _error([*command, "--config", str(config)], capsys)
    assert f"--config {config}" in err and expected in err


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    from selfsup.core.config import read_yaml

    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n")
    assert read_yaml(path)["d"] == {"x": 3, "y": 2}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("-1,cat", "labels.csv:3: index -1 must be >= 0"),
        ("x1,cat", "labels.csv:3: index 'x1' is not a whole number"),
        ("²,cat", "labels.csv:3: index '²' is not a whole number"),
    ],
)
def test_a_negative_label_index_is_refused_naming_its_row(
    row: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(f"index,label\n0,dog\n{row}\n", encoding="utf-8")
    out = str(tmp_path / "c.safetensors")
    err = _error(["classify", str(tmp_path / "run"), "--labels", str(labels), "--out", out], capsys)
    assert expected in err


def test_random_bytes_as_npz_are_not_a_readable_file_never_unsafe_advice(tmp_path: Path) -> None:
    """numpy takes any non-zip, non-.npy file for pickled data and suggests loading it
    unsafely; every reader says it is not a readable file instead."""
    from selfsup.image.data import load_splits
    from selfsup.image.use.search import load_index
    from selfsup.lm.data.corpus import load_ids

    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    for read in (load_index, load_ids, lambda p: load_splits(f"npz:{p}")):
        with pytest.raises(SelfsupError) as e:
            read(path)
        message = str(e.value)
        assert str(path) in message and "not a readable" in message
        assert not any(word in message.lower() for word in ("unsafe", "allow_pickle", "pickle"))


@pytest.mark.parametrize(("method", "size"), [("simclr", 1), ("rotation", 3)])
def test_images_too_small_for_the_method_are_refused(
    method: str, size: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """300 images of 1×1 pixel used to train without a word."""
    data = tmp_path / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 256, (300, size, size, 3), dtype=np.uint8))
    out = tmp_path / "run"
    argv = ["pretrain", method, "--data", f"npz:{data}", "--batch-size", "50", "--out", str(out)]
    err = _error(argv, capsys)
    expected = f"{size}×{size}-pixel images are too small for {method}, which needs at least 4×4"
    assert f"--data npz:{data}: {expected} pixels (--image-size 4 or more enlarges them)" in err
    assert not out.exists()


def test_min_image_side_is_the_convnet_s_first_pool() -> None:
    """The floor is where the ConvNet's first 2×2 pool still runs (it skips maps of <= 2 px)."""
    import torch

    from selfsup.image.methods.base import Method
    from selfsup.image.models.backbones import _Downsample

    side = Method.min_image_side
    x = torch.zeros(1, 1, side, side)
    assert _Downsample()(x).shape[-1] == side // 2
    assert _Downsample()(x[..., : side - 2, : side - 2]).shape[-1] == side - 2
