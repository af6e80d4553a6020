"""One grammar: config files in and out, --version, instant help, small tries, a closing summary."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfsup.cli.main import main
from selfsup.image.methods.base import Method

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = ["--data", "digits", "--limit", "256", "--batch-size", "64", "--epochs", "1"]


def _options(run: Path) -> dict:
    config = yaml.safe_load((run / "config.yaml").read_text())
    return {k: v for k, v in config.items() if k not in ("out", "encoder")}


def test_a_runs_config_yaml_repeats_it_and_flags_override(tmp_path: Path, capsys) -> None:
    first, again, changed = tmp_path / "first", tmp_path / "again", tmp_path / "changed"
    argv = ["pretrain", "simclr", *QUICK, "--lr", "0.002", "--temperature", "0.3"]
    assert main([*argv, "--out", str(first)]) == 0
    config = str(first / "config.yaml")
    assert main(["pretrain", "--config", config, "--out", str(again)]) == 0  # no METHOD needed
    assert _options(again) == _options(first)
    assert main(["pretrain", "--config", config, "--lr", "0.01", "--out", str(changed)]) == 0
    expected = {**_options(first), "lr": 0.01}
    assert _options(changed) == expected


def test_a_users_config_file_and_its_mistakes(tmp_path: Path, capsys) -> None:
    good = tmp_path / "quick.yaml"
    good.write_text("data: digits\nlimit: 256\nbatch-size: 64\nepochs: 1\ndevices: 1\n")
    run = tmp_path / "run"
    assert main(["pretrain", "rotation", "--config", str(good), "--out", str(run)]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["method"], saved["batch_size"], saved["devices"]) == ("rotation", 64, "1")
    for text, message in [
        ("lrr: 1\n", "'lrr' is not an option"),
        ("epochs: many\n", "epochs must be int"),
        ("- a list\n", "expected a mapping"),
        ("data: [unclosed\n", "not valid YAML"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        capsys.readouterr()
        assert main(["pretrain", "simclr", "--config", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main(["evaluate", str(run), "--config", str(tmp_path / "missing.yaml")]) == 2


def test_version_and_help_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from selfsup.cli.main import main\n"
        "for argv in (['--help'], ['pretrain', 'mae', '--help'], ['evaluate', '--help'],"
        " ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("NO TORCH"), done.stdout[-500:]
    assert "selfsup 0." in done.stdout
    assert "--mask-ratio" in done.stdout and "(default: " in done.stdout


def test_a_small_try_validates_on_a_small_test_split(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    step = Method.validation_step

    def counting(self, batch, batch_idx):
        seen.append(len(batch[0]))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(Method, "validation_step", counting)
    argv = ["pretrain", "simclr", "--data", "digits", "--limit", "128", "--batch-size", "64"]
    assert main([*argv, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    assert sum(seen) == 128  # not the 360 test digits


def test_a_run_ends_with_a_summary_and_epoch_lines_off_a_terminal(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["pretrain", "simclr", *QUICK, "--epochs", "2", "--out", str(run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("epoch 1/2  loss ") and out[1].startswith("epoch 2/2  loss ")
    assert out[-1] == f"next: selfsup evaluate {run}"
    assert 3 <= len(out[2:]) <= 6 and "2 epoch(s) of 256 images" in out[2]
    assert not any("\r" in line or "it/s" in line for line in out)  # no progress bars


def test_limit_bounds_the_test_split_of_embed_and_evaluate(tmp_path: Path, capsys) -> None:
    import json

    import numpy as np

    run = tmp_path / "run"
    assert main(["pretrain", "simclr", *QUICK, "--out", str(run)]) == 0
    out = tmp_path / "e.npy"
    assert main(["embed", str(run), "--split", "test", "--limit", "50", "-o", str(out)]) == 0
    assert np.load(out).shape[0] == 50  # not the 360 test digits
    argv = ["evaluate", str(run), "--limit", "200", "--fractions", "1", "--seeds", "1"]
    assert main([*argv, "--baselines", "none", "--no-kmeans"]) == 0
    results = json.loads((run / "eval" / "digits" / "results.json").read_text())
    assert (results["train_size"], results["test_size"]) == (200, 200)


def _leaves(parser, words=()):
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(words), parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaves(sub, (*words, name))


def test_every_command_takes_a_config_file() -> None:
    from selfsup.cli.main import build_parser

    leaves = dict(_leaves(build_parser()))
    assert {"pretrain", "evaluate", "select", "lm best-of-n", "lm icl few-shot"} <= set(leaves)
    missing = [name for name, p in leaves.items() if "--config" not in p._option_string_actions]
    assert not missing


def test_a_config_file_on_any_command_gives_options_and_flags_win(tmp_path: Path, capsys) -> None:
    file = tmp_path / "task.yaml"
    file.write_text("sft: 5\nnum-prompts: 7\nmax_operand: 9\n")
    folder = tmp_path / "task"
    assert main(["lm", "arithmetic", str(folder), "--config", str(file), "--num-prompts", "3"]) == 0

    def records(name: str) -> int:
        return len((folder / name).read_text().splitlines())

    assert (records("sft.jsonl"), records("rl.jsonl")) == (5, 3)  # the file's 5, the flag's 3
    assert all(o <= 9 for o in map(int, re.findall(r"\d+", (folder / "rl.jsonl").read_text())))
    # the file may give options argparse requires; its mistakes are one line each
    for text, message in [
        ("reward: rm\nprompts: p.jsonl\nlimit: 0\n", "required: --policy"),
        ("policy: a\nreward: rm\nprompts: p.jsonl\nlimit: 0\n", "--limit must be at least 1"),
        ("policy: a\nbogus: 1\n", "'bogus' is not an option of this command"),
        ("policy: [a, b]\n", "policy takes one value, got a list"),
        ("limit: many\n", "argument --limit: invalid int value: 'many'"),
    ]:
        file.write_text(text)
        capsys.readouterr()
        assert main(["lm", "best-of-n", "--config", str(file)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (text, err)
    file.write_text(f"folder: {folder}\n")  # a positional stays on the command line
    capsys.readouterr()
    assert main(["lm", "arithmetic", str(folder), "--config", str(file)]) == 2
    assert "'folder' is given on the command line" in capsys.readouterr().err
