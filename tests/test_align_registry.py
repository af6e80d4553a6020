"""The ALIGN registry: each stage's Options as the command line reads them from the source equal
the imported dataclass; declared ranges give one line each; a new stage is one file plus one
registry line (its command, flags and dispatch come from the registry)."""

from __future__ import annotations

import dataclasses
import math
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from selfsup.cli.main import main
from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.lm.alignment import ALIGN
from selfsup.lm.options import check_declared


@pytest.mark.parametrize("name", sorted(ALIGN))
def test_options_read_from_the_source_equal_the_imported_dataclass(name: str) -> None:
    stage = ALIGN.load(name)
    imported = [
        (f.name, f.default, f.metadata["help"], dict(f.metadata))
        for f in dataclasses.fields(stage.Options)
    ]
    read = [
        (s.name, s.default, s.help, {"help": s.help, **s.metadata}) for s in ALIGN.options(name)
    ]
    assert read == imported  # the same fields, in a dataclass's order (overrides in place)
    about = ALIGN.about(name)
    assert about["help"] == stage.help and about["entry"] == stage.entry
    assert callable(getattr(sys.modules[stage.__module__], stage.entry))


@dataclass
class _Ranges:
    positive: float = option(1.0, "", check=">0")
    some: float = option(0.0, "", check=">=0")
    count: int = option(2, "", check=">=2")
    share: float = option(0.5, "", check="[0,1]")
    part: float = option(0.5, "", check="[0,1)")
    name: str = option("", "", required=True)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"positive": 0.0}, "--positive must be positive, got 0.0"),
        ({"positive": math.nan}, "--positive must be positive, got nan"),
        ({"some": -1e-9}, "--some must be zero or more, got -1e-09"),
        ({"count": 1}, "--count must be at least 2, got 1"),
        ({"share": 1.5}, "--share must be between 0 and 1, got 1.5"),
        ({"share": math.nan}, "--share must be between 0 and 1, got nan"),
        ({"part": 1.0}, "--part must be at least 0 and below 1, got 1.0"),
        ({"positive": math.inf}, "--positive must be positive, got inf"),
        ({"name": ""}, "--name is required"),
    ],
)
def test_declared_ranges_are_one_line_each(values: dict, message: str) -> None:
    with pytest.raises(SelfsupError) as e:
        check_declared(_Ranges(**{"name": "x", **values}))
    assert str(e.value) == message


def test_the_edges_of_declared_ranges_pass() -> None:
    check_declared(_Ranges(positive=1e300, some=0.0, count=2, share=1.0, part=0.0, name="x"))


TOY = """
from dataclasses import dataclass
from pathlib import Path

from selfsup.core.config import option
from selfsup.lm.alignment.stage import Stage
from selfsup.lm.options import EngineOptions, check_declared


@dataclass
class Options(EngineOptions):
    out: str = option("", "run directory to write", required=True)
    rate: float = option(0.5, "a toy rate", check=">0")


def toy(options: Options, command: str | None = None) -> Path:
    check_declared(options)
    out = Path(options.out)
    out.mkdir()
    (out / "seen.txt").write_text(f"{options.rate} {options.seed} {command}")
    return out


class Toy(Stage):
    Options = Options
    help = "a toy stage"
    entry = "toy"
"""


def test_a_new_stage_is_one_file_and_one_registry_line(tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "toy_stage.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ALIGN, "toy", "toy_stage:Toy")
    monkeypatch.setenv("SELFSUP_REPORT", "0")
    with pytest.raises(SystemExit):
        main(["lm", "--help"])
    assert "a toy stage" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["lm", "toy", "--help"])
    text = capsys.readouterr().out
    assert "--rate RATE" in text and "a toy rate (default: 0.5)" in text and "--seed" in text
    out = tmp_path / "run"
    assert main(["lm", "toy", "--out", str(out), "--rate", "2", "--seed", "3"]) == 0
    assert (out / "seen.txt").read_text().startswith("2.0 3 selfsup lm toy --out")
    assert f"run directory: {out}/" in capsys.readouterr().out
    assert main(["lm", "toy", "--rate", "2"]) == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err
    assert main(["lm", "toy", "--out", str(tmp_path / "b"), "--rate", "-1"]) == 2
    assert "--rate must be positive, got -1.0" in capsys.readouterr().err
