"""One range check, one wording: the same kind of mistake reads the same on an image option, a
language option (lm pretrain's LMConfig, a stage's Options) and a CLI-declared `check=`."""

from __future__ import annotations

import pytest

from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.lm.options import PPOSettings, TuneConfig, check_declared


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("image", "language", "line"),
    [
        (  # ">0"
            ["pretrain", "simclr", "--data", "digits", "--lr", "-1"],
            ["lm", "pretrain", "gpt", "--data", "c.txt", "--lr", "-1"],
            "selfsup: error: --lr must be positive, got -1.0\n",
        ),
        (  # ">=0"
            ["pretrain", "simclr", "--data", "digits", "--weight-decay", "nan"],
            ["lm", "pretrain", "gpt", "--data", "c.txt", "--weight-decay", "nan"],
            "selfsup: error: --weight-decay must be zero or more, got nan\n",
        ),
    ],
)
def test_the_same_mistake_is_the_same_line_on_both_halves(
    tmp_path, monkeypatch, capsys, image, language, line
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _error(image, capsys) == line
    assert _error(language, capsys) == line
    assert not any(tmp_path.iterdir())  # refused before any folder


def test_a_range_reads_alike_on_image_stage_and_cli_options(capsys) -> None:
    between = "--momentum must be between 0 and 1, got 1.5\n"
    assert _error(["pretrain", "byol", "--data", "digits", "--momentum", "1.5"], capsys).endswith(
        between
    )
    with pytest.raises(SelfsupError) as e:  # a stage's Options, as `selfsup.align` checks them
        check_declared(PPOSettings(gamma=1.5))
    assert str(e.value) == "--gamma must be between 0 and 1, got 1.5"
    with pytest.raises(SelfsupError) as e:
        check_declared(TuneConfig(init="a", data="b", out="c", lr=-1.0))
    assert str(e.value) == "--lr must be positive, got -1.0"
    # an option the CLI declares with add_argument(..., check=...) reads the same
    assert _error(["lm", "chat", "run", "--temperature", "-1"], capsys).endswith(
        "--temperature must be zero or more, got -1.0\n"
    )
    assert _error(["lm", "neighbors", "run", "w", "--top-k", "0"], capsys).endswith(
        "--top-k must be at least 1, got 0\n"
    )


FINITE = "--no-end-score must be a finite number"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["lm", "grpo", "--no-end-score", "nan"], f"{FINITE}, got nan"),
        (["lm", "rlhf", "--no-end-score", "inf"], f"{FINITE}, got inf"),
        (["lm", "grpo", "--temperature", "inf"], "--temperature must be positive, got inf"),
        (["lm", "best-of-n", "--pool", "-1"], "--pool must be zero or more, got -1"),
        (["lm", "label", "r", "--prompts", "p", "-o", "o", "--k", "27"],
         "--k must be between 2 and 26, got 27"),
        (["lm", "label", "r", "--prompts", "p", "-o", "o", "--max-new-tokens", "0"],
         "--max-new-tokens must be at least 1, got 0"),
    ],
)  # fmt: skip
def test_online_stage_ranges_are_declared_and_read_alike(
    tmp_path, monkeypatch, capsys, argv, line
) -> None:
    monkeypatch.chdir(tmp_path)
    if argv[1] != "label":
        names = ("--policy", "--reward", "--prompts", "--out")
        argv = [*argv, *(x for n in names for x in (n, str(tmp_path / n[2:])))]
    assert _error(argv, capsys).endswith(f"selfsup: error: {line}\n")
    assert not any(tmp_path.iterdir())  # refused before any file is read or written


def test_options_ppo_and_grpo_share_are_declared_once() -> None:
    from dataclasses import fields

    from selfsup.lm.alignment import ALIGN

    shared = ("clip", "max_new_tokens", "temperature", "no_end_score", "max_grad_norm", "max_kl")
    grpo, rlhf = ({s.name: s for s in ALIGN.options(n)} for n in ("grpo", "rlhf"))
    assert all(grpo[n] == rlhf[n] for n in shared)  # one declaration: default, help, range
    assert {f.name for f in fields(PPOSettings)} >= set(shared) - {"max_kl"}
