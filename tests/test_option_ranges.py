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
