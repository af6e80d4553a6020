"""`selfsup.align(stage, **options)`: the Python entry of the language stages writes the same
run folder and report as `selfsup lm STAGE` (the command goes through it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import selfsup
from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def _key_content(page: Path, run: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The page's headings and its config table (option, value), the run's path left out."""
    html = page.read_text().replace(str(run), "RUN")
    headings = [
        re.sub(rf"\b{run.name}$", "RUN", h) for h in re.findall(r"<h[1-3][^>]*>([^<]*)", html)
    ]
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td></tr>", html)
    return headings, rows


def test_the_python_call_writes_the_report_the_command_writes(
    tmp_path, chat_base, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("SELFSUP_REPORT", "1")
    options = {"epochs": 1, "batch_size": 8, "max_length": 48, "accelerator": "cpu"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    init, data = str(chat_base / "base"), str(chat_base / "sft.jsonl")
    cli = tmp_path / "cli"
    assert main(["lm", "sft", "--init", init, "--data", data, "--out", str(cli), *flags]) == 0
    assert f"report: {cli / 'report.html'}" in capsys.readouterr().out.splitlines()
    py = selfsup.align("sft", init=init, data=data, out=str(tmp_path / "py"), **options)
    assert py == tmp_path / "py"
    assert "report.html" in _files(cli) and _files(py) == _files(cli)
    headings, rows = _key_content(py / "report.html", py)
    assert (headings, rows) == _key_content(cli / "report.html", cli)
    assert "Training curves" in headings and ("stage", "sft") in rows and ("epochs", "1") in rows
    # report=False: the run alone, as SELFSUP_REPORT=0 leaves it
    bare = selfsup.align("sft", init=init, data=data, out=str(tmp_path / "bare"), report=False,
                         **options)  # fmt: skip
    assert _files(bare) == [f for f in _files(cli) if f != "report.html"]


def test_a_wrong_stage_or_option_is_one_line() -> None:
    with pytest.raises(SelfsupError, match=r"^unknown stage 'sfft'; expected one of sft, "):
        selfsup.align("sfft")
    with pytest.raises(SelfsupError, match=r"^sft: lrate is not an option of this stage$"):
        selfsup.align("sft", lrate=1.0)
    with pytest.raises(SelfsupError, match=r"^--lr must be positive, got -1.0$"):
        selfsup.align("sft", init="a", data="b", out="c", lr=-1.0)
