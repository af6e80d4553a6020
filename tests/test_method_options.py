"""A method owns its options: declared once in its file, read without importing it for the
command line, identical to the dataclass training imports."""

from __future__ import annotations

import dataclasses
import typing

import pytest

import selfsup
from selfsup.cli.main import build_parser, main
from selfsup.core.config import type_of
from selfsup.core.errors import SelfsupError
from selfsup.image.config import PretrainConfig
from selfsup.image.methods import METHODS, get_method


@pytest.mark.parametrize("method", sorted(METHODS))
def test_options_read_from_the_source_equal_the_imported_dataclass(method: str) -> None:
    cls = get_method(method).Options
    hints = typing.get_type_hints(cls)
    imported = {
        f.name: (hints[f.name], f.default, f.metadata.get("help"), dict(f.metadata))
        for f in dataclasses.fields(cls)
    }
    read = {
        spec.name: (spec.type, spec.default, spec.help, {"help": spec.help, **spec.metadata})
        for spec in METHODS.options(method)
    }
    assert read.keys() == imported.keys()
    for name, (annotation, default, help_text, metadata) in read.items():
        hint, want_default, want_help, want_metadata = imported[name]
        assert type_of(annotation) in typing.get_args(hint) + (hint,), name
        assert (default, help_text, metadata) == (want_default, want_help, want_metadata), name


def test_no_method_option_is_shared_and_the_shared_config_names_none() -> None:
    shared = {f.name for f in dataclasses.fields(PretrainConfig)}
    for method in METHODS:
        assert not shared & {s.name for s in METHODS.options(method)}, method
    assert {"mask_ratio", "temperature", "jigsaw_grid", "text_width"}.isdisjoint(shared)


@pytest.mark.parametrize(
    ("method", "flag", "value", "name", "parsed"),
    [
        ("mae", "--mask-ratio", "0.6", "mask_ratio", 0.6),
        ("simclr", "--temperature", "0.2", "temperature", 0.2),
        ("jigsaw", "--jigsaw-grid", "2", "jigsaw_grid", 2),
        ("inpainting", "--no-rec-outside", None, None, None),
    ],
)
def test_help_and_parsing_show_only_the_methods_own_options(
    method, flag, value, name, parsed, capsys
) -> None:
    with pytest.raises(SystemExit):
        build_parser(method=method).parse_args(["pretrain", method, "--help"])
    shown = capsys.readouterr().out
    own = {s.name for s in METHODS.options(method)}
    for other in METHODS:
        for spec in METHODS.options(other):
            flag_of = "--" + spec.name.replace("_", "-")
            assert (flag_of + " " in shown or flag_of + "\n" in shown) == (spec.name in own), (
                other,
                spec.name,
            )
    if name is None:  # not a bool option of inpainting: refused in one line
        assert main(["pretrain", method, flag]) == 2
        return
    args = build_parser(method=method).parse_args(["pretrain", method, flag, value])
    assert getattr(args, name) == parsed
    # an option of another method is refused
    other = "simclr" if method != "simclr" else "mae"
    foreign = "--" + METHODS.options(other)[0].name.replace("_", "-")
    if foreign not in {"--" + s.name.replace("_", "-") for s in METHODS.options(method)}:
        assert main(["pretrain", method, foreign, "1"]) == 2


def test_the_python_api_routes_a_methods_options_and_refuses_foreign_ones(tmp_path) -> None:
    quick = dict(data="digits", limit=128, batch_size=64, epochs=1)
    with pytest.raises(SelfsupError, match="mask_ratio is not an option of simclr"):
        selfsup.pretrain(method="simclr", mask_ratio=0.5, out=str(tmp_path / "a"), **quick)
    with pytest.raises(SelfsupError, match="--temperature must be positive"):
        selfsup.pretrain(method="simclr", temperature=-1.0, out=str(tmp_path / "b"), **quick)
    assert not any(tmp_path.iterdir())
