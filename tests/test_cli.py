"""The `selfsup` command: options mirror the API, errors are one line with a non-zero exit."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.cli.main import build_parser, main
from selfsup.image.config import EvalConfig, PretrainConfig


def test_cli_options_mirror_the_api_defaults() -> None:
    parser = build_parser()
    args = parser.parse_args(["pretrain", "simclr"])
    for f in dataclasses.fields(PretrainConfig):
        if f.metadata.get("cli", True):  # not METHOD (given here) nor the method's options
            assert getattr(args, f.name) == f.default, f.name
    args = parser.parse_args(["evaluate", "runs/x"])
    for f in dataclasses.fields(EvalConfig):
        assert getattr(args, f.name) == f.default, f.name


def test_pretrain_embed_evaluate_from_the_command_line(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    code = main(
        [
            "pretrain",
            "simclr",
            "--data",
            "digits",
            "--limit",
            "256",
            "--batch-size",
            "128",
            "--epochs",
            "1",
            "--out",
            str(run),
            "--no-online-probe",
        ]
    )
    assert code == 0
    assert "--no-online-probe" in (run / "command.txt").read_text()

    out = tmp_path / "emb.npy"
    assert main(["embed", str(run), "--split", "test", "-o", str(out)]) == 0
    assert np.load(out).shape[0] == 360 and np.load(tmp_path / "emb.labels.npy").shape == (360,)

    capsys.readouterr()
    code = main(
        [
            "evaluate",
            str(run),
            "--fractions",
            "0.1,1",
            "--seeds",
            "1",
            "--baselines",
            "raw",
            "--no-kmeans",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "linear probe" in printed and "10%" in printed and "100%" in printed
    assert (run / "eval" / "digits" / "few_label.csv").is_file()
    assert (run / "eval" / "digits" / "few_label.png").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pretrain", "simclr", "--data", "npz:/no/such/place"], "/no/such/place"),
        (["evaluate", "/no/such/run"], "/no/such/run"),
        (["embed", "/no/such/run", "-o", "x.npy"], "/no/such/run"),
        (["augment-preview", "/no/such/image.png"], "/no/such/image.png"),
        (["evaluate", "runs/x", "--fractions", "1%"], "--fractions '1%'"),
        (["evaluate", "runs/x", "--fractions", "0,0.5"], "--fractions"),
        (["evaluate", "runs/x", "--baselines", "linear"], "--baselines"),
        (["evaluate", "runs/x", "--probe", "svm"], "--probe"),
        (["evaluate", "runs/x", "--seeds", "0"], "--seeds"),
    ],
)
def test_user_errors_are_one_line_without_traceback(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_unknown_method_is_rejected_by_the_parser(capsys) -> None:
    assert main(["pretrain", "moco-v9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "invalid choice: 'moco-v9'" in err and "\n" not in err


def test_augment_preview_draws_the_users_image(tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "grid.png"
    assert main(["augment-preview", str(image), "-o", str(out), "--size", "64"]) == 0
    assert Image.open(out).size[0] > 64 * 4


def test_console_script_help_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "selfsup.cli.main", "pretrain", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--batch-size" in result.stdout and "--resume" in result.stdout


def test_every_command_is_one_row_of_the_dispatch_table(monkeypatch, tmp_path: Path) -> None:
    """The parser's commands are exactly COMMANDS' rows, and a command runs its row's handler."""
    from selfsup.cli import main as cli

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(cli.COMMANDS)
    seen = []
    add, _ = cli.COMMANDS["export"]
    monkeypatch.setitem(cli.COMMANDS, "export", (add, lambda args, argv: seen.append(argv)))
    assert main(["export", str(tmp_path), "--format", "safetensors"]) == 0
    assert seen == [["export", str(tmp_path), "--format", "safetensors"]]


def test_the_shared_module_builds_the_whole_parser_for_lm() -> None:
    """`selfsup lm` parses its line again through selfsup.cli.common, which imports no command."""
    from selfsup.cli import common

    argv = ["lm", "pretrain", "gpt", "--steps", "3"]
    words, leaf, _ = common.command_path(common.build_parser(), argv)
    assert words == ["lm", "pretrain", "gpt"] and "--steps" in leaf._option_string_actions
