"""`--config FILE.yaml` on every command whose options are not a config dataclass.

`pretrain`, `evaluate` and the language training commands read a file against their
dataclasses (`selfsup.core.config.read_config_file`). Every other command gets the same option
here: the file's `option: value` pairs become command-line tokens placed before the ones the
user typed, so argparse checks them as it checks flags (types, choices, required options) and
a flag given on the command line wins (argparse keeps an option's last value).
"""

from __future__ import annotations

import argparse
from typing import Any

from selfsup.cli.common import command_path
from selfsup.core.config import read_yaml_mapping
from selfsup.core.errors import SelfsupError

DEST = "options_file"
HELP = "options from a YAML file (option: value); flags given here override it"


def add_everywhere(parser: argparse.ArgumentParser) -> None:
    """Add `--config FILE.yaml` to every leaf command of `parser` that has none."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subparsers:
        for sub in {id(p): p for a in subparsers for p in a.choices.values()}.values():
            add_everywhere(sub)
    elif "--config" not in parser._option_string_actions:
        parser.add_argument("--config", dest=DEST, metavar="FILE.yaml", help=HELP)


def expand(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with the options of its `--config FILE.yaml` inserted after its command words
    (unchanged when the command has no such option or none is given). Done before parsing, so
    the file may give the command's required options."""
    words, leaf, _ = command_path(parser, argv)
    action = leaf._option_string_actions.get("--config")
    path = _given(argv, "--config")
    if action is None or action.dest != DEST or path is None:
        return argv
    at = _after_words(argv, words)
    return [*argv[:at], *file_tokens(leaf, path), *argv[at:]]


def _given(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in `argv` (`--flag VALUE` or `--flag=VALUE`; the last one), or None."""
    value = None
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(flag + "="):
            value = token[len(flag) + 1 :]
    return value


def _after_words(argv: list[str], words: list[str]) -> int:
    """The index in `argv` just after its last command word."""
    at = 0
    for word in words:
        at = argv.index(word, at) + 1
    return at


def file_tokens(leaf: argparse.ArgumentParser, path: str) -> list[str]:
    """The YAML mapping at `path` as the command-line tokens of `leaf`'s options."""
    values = read_yaml_mapping(path, "--config")
    actions = {
        a.dest: a
        for a in reversed(leaf._actions)  # the first (visible) spelling wins over an alias
        if a.option_strings and a.dest not in (DEST, "help", "debug")
    }
    positionals = {a.dest for a in leaf._actions if not a.option_strings}
    tokens: list[str] = []
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in positionals:
            raise SelfsupError(f"--config {path}: {key!r} is given on the command line, not here")
        if name not in actions:
            raise SelfsupError(f"--config {path}: {key!r} is not an option of this command")
        tokens += _tokens(actions[name], value, f"--config {path}: {key}")
    return tokens


def _tokens(action: argparse.Action, value: Any, where: str) -> list[str]:
    flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
    if value is None:
        return []
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise SelfsupError(f"{where} must be true or false, got {value!r}")
        return [flag if value else "--no-" + flag[2:]]
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise SelfsupError(f"{where} must be true or false, got {value!r}")
        return [flag] if value != action.default else []
    if isinstance(value, (list, tuple)):
        if action.nargs in (None, "?"):
            raise SelfsupError(f"{where} takes one value, got a list")
        return [flag, *map(str, value)]
    if isinstance(value, dict):
        raise SelfsupError(f"{where} takes a value, got a mapping")
    return [f"{flag}={value}"]  # `=` keeps a value that starts with "-" a value
