"""Configuration dataclasses shared by the Python API and the CLI (same names, same defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from selfsup.core.errors import SelfsupError


def option(default: Any, help: str, **kw: Any) -> Any:
    """A config field: its help text, and optionally `check`, the range its value must lie in
    (">0", ">=0", ">N", ">=N", "[a,b]", "(a,b)", "[a,b)", "(a,b]", "finite": any number but NaN
    and infinities) or a named rule ("seed", "precision"), and `required=True` (an empty value
    is refused); None always passes; both are checked by `check_fields`. `cli=False` keeps it
    off the command line."""
    return field(default=default, metadata={"help": help, **kw})


# The common range of numpy's and Lightning's seeds (np.random.seed: an unsigned 32-bit
# integer; torch.manual_seed would take up to 2**64 - 1).
SEED_MAX = 2**32 - 1
# Lightning 2's `precision` values (lightning.fabric.connector._PRECISION_INPUT), listed here so
# that a bad one is refused before Lightning is imported.
PRECISIONS = (
    *("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"),
    *("transformer-engine", "transformer-engine-float16", "64", "32", "16", "bf16"),
)


def check_seed(value: int, flag: str = "--seed") -> int:
    """`value` if it is a seed numpy, torch and Lightning all accept, else a one-line error."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise SelfsupError(f"{flag} must be a whole number from 0 to {SEED_MAX}, got {value!r}")
    return value


def seed_type(text: str) -> int:
    """argparse type of a `--seed`: a whole number from 0 to SEED_MAX."""
    try:
        return check_seed(int(text))
    except (ValueError, SelfsupError):
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 0 to {SEED_MAX}, got {text!r}"
        ) from None


def check_precision(value: str, flag: str = "--precision") -> str:
    """`value` if Lightning accepts it as a precision, else a one-line error listing them."""
    if str(value) not in PRECISIONS:
        raise SelfsupError(f"{flag} {value!r} is unknown; expected one of {', '.join(PRECISIONS)}")
    return str(value)


def _in_range(value: float, rule: str) -> bool:
    """Whether `value` satisfies `rule` (NaN and infinities satisfy none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if rule == "finite":
        return True
    if rule[0] == ">":
        closed = rule[1] == "="
        low = float(rule[1 + closed :])
        return value >= low if closed else value > low
    low, high = (float(v) for v in rule[1:-1].split(","))
    above = value >= low if rule[0] == "[" else value > low
    below = value <= high if rule[-1] == "]" else value < high
    return above and below


def range_words(rule: str) -> str:
    """What a `check=` range asks for, in words: ">0" positive, ">=0" zero or more, ">=N" at
    least N, ">N" above N, "[a,b]" between a and b, "(a,b)" between a and b (exclusive),
    "[a,b)" at least a and below b, "(a,b]" above a and at most b, "finite" a finite number."""
    if rule == "finite":
        return "a finite number"
    if rule[0] == ">":
        closed = rule[1] == "="
        low = rule[1 + closed :]
        if float(low) == 0:
            return "zero or more" if closed else "positive"
        return f"at least {low}" if closed else f"above {low}"
    low, high = rule[1:-1].split(",")
    return {
        "[]": f"between {low} and {high}",
        "()": f"between {low} and {high} (exclusive)",
        "[)": f"at least {low} and below {high}",
        "(]": f"above {low} and at most {high}",
    }[rule[0] + rule[-1]]


def check_range(value: float, rule: str, flag: str) -> None:
    """The one line of every option outside its range (`check=` rule, as `option` lists):
    "--lr must be positive, got -1.0"; NaN and infinities are outside every range."""
    if not _in_range(value, rule):
        raise SelfsupError(f"{flag} must be {range_words(rule)}, got {value}")


def check_fields(config: Any) -> None:
    """Raise a one-line SelfsupError for the first field declared `required=True` and left
    empty, then for the first outside its declared type or range (`check=`): the one check of
    the options of both halves, image and language."""
    for f in dataclasses.fields(config):
        if f.metadata.get("required") and not getattr(config, f.name):
            raise SelfsupError(f"--{f.name.replace('_', '-')} is required")
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        if tp in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SelfsupError(f"{flag} must be a number, got {value!r}")
        if tp is int and not isinstance(value, int):
            raise SelfsupError(f"{flag} must be a whole number, got {value!r}")
        rule = f.metadata.get("check")
        if rule == "seed":
            check_seed(value, flag)
        elif rule == "precision":
            check_precision(value, flag)
        elif rule:
            check_range(value, rule, flag)


# The sections a run's config.yaml adds to the options (what was learned about the data).
RUN_SECTIONS = ("dataset", "encoder", "text", "captions")


def read_config_file(
    path: str, types: dict[str, type], ignored: set[str] = frozenset()
) -> dict[str, Any]:
    """Options from a YAML file, checked against `types` (option name -> type); one line for
    anything wrong. Keys may be spelled with - or _.

    A run's own config.yaml is accepted as it is: its data sections, its run folder (`out`),
    `resume` and the `ignored` names (other methods' options an older run recorded) are
    skipped, so giving it back starts a new run with the same options.
    """
    values = read_yaml_mapping(path, "--config")
    is_run = "encoder" in values
    options: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if is_run and (name in RUN_SECTIONS or name in ("out", "resume") or name in ignored):
            continue
        if name not in types:
            raise SelfsupError(f"--config {path}: {key!r} is not an option of this command")
        options[name] = typed_value(value, types[name], f"--config {path}: {key}")
    return options


MAX_YAML_DEPTH = 50  # nesting of an options file (a flat mapping; a run's config.yaml has 3)


def read_yaml(path: str | Path, where: str | None = None) -> Any:
    """The value of a YAML file, read safely; one line (`where`, default the path) for a file
    that cannot be read, is not YAML, nests deeper than MAX_YAML_DEPTH or gives a key twice."""
    import yaml

    where = where or str(path)
    try:
        with open(path, encoding="utf-8") as f:
            loader = _strict_loader()(f)  # a SafeLoader: plain data only, no Python objects
            try:
                return loader.get_single_data()
            finally:
                loader.dispose()
    except OSError as e:
        raise SelfsupError(f"{where}: cannot read it ({e.strerror})") from None
    except _Refused as e:
        raise SelfsupError(f"{where}:{e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f"line {mark.line + 1}: " if mark else ""
        raise SelfsupError(f"{where}: not valid YAML ({line}{e.problem or e.context})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SelfsupError(f"{where}: not valid YAML ({type(e).__name__})") from None


def read_yaml_mapping(path: str | Path, flag: str) -> dict[str, Any]:
    """`read_yaml` of an options file given as `flag FILE`: a mapping (empty for an empty file)
    whose keys, spelled with - or _, name each option once."""
    where = f"{flag} {path}"
    values = read_yaml(path, where)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SelfsupError(f"{where}: expected a mapping of option: value")
    spelled: dict[str, Any] = {}
    for key in values:  # `batch-size` and `batch_size` are one option
        name = str(key).replace("-", "_")
        if name in spelled:
            raise SelfsupError(
                f"{where}: {spelled[name]!r} and {key!r} are one option, given twice"
            )
        spelled[name] = key
    return values


class _Refused(Exception):
    """A YAML file the strict loader refuses; the message starts with its line number."""


@functools.cache
def _strict_loader() -> type:
    """yaml.SafeLoader that refuses a key given twice in one mapping (SafeLoader keeps the
    last silently) and nesting deeper than MAX_YAML_DEPTH (its composer recurses: a few
    thousand levels end in RecursionError)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.depth += 1
            try:
                if self.depth > MAX_YAML_DEPTH:
                    line = self.peek_event().start_mark.line + 1
                    raise _Refused(f"{line}: too deeply nested (over {MAX_YAML_DEPTH} levels)")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        twice = f"{key!r} is given twice (first on line {first[key]})"
                        raise _Refused(f"{line}: {twice}")
                    first[key] = line
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    break
            return super().construct_mapping(node, deep)

    return StrictLoader


def typed_value(value: Any, tp: type, where: str) -> Any:
    """A YAML value as the option's type (`devices: 2` is the string "2"; 1 is 1.0)."""
    if value is None:
        return None
    if tp is str and not isinstance(value, (dict, list)):
        return str(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise SelfsupError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; plain types pass through."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def type_of(annotation: str) -> type:
    """The option type an annotation names: "int | None" -> int."""
    names = [part.strip() for part in annotation.split("|") if part.strip() != "None"]
    return TYPES[names[0]]


def field_types(cls: type) -> dict[str, type]:
    """A config dataclass's command-line options and their types."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: _base_type(hints[f.name])
        for f in dataclasses.fields(cls)
        if f.metadata.get("cli", True)
    }


def add_option(
    parser: Any, name: str, tp: type, default: Any, help: str, *, suppress: bool = False
) -> None:
    """`--name-with-dashes` (bools as --x/--no-x); `suppress` leaves an option that is not
    given out of the namespace, so that only what the user chose is passed on."""
    flag = "--" + name.replace("_", "-")
    # (argparse's BooleanOptionalAction adds the default to the help itself.)
    shown = f" (default: {default})" if default is not None and (tp is not bool or suppress) else ""
    kwargs: dict[str, Any] = dict(
        dest=name, default=argparse.SUPPRESS if suppress else default, help=help + shown
    )
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    else:
        parser.add_argument(flag, type=tp, **kwargs)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Mirror a config dataclass as `--field-name` options (bools become --x/--no-x)."""
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in types_:
            add_option(parser, f.name, types_[f.name], f.default, f.metadata.get("help", ""))


def from_namespace(cls: type, ns: argparse.Namespace, **extra: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(ns).items() if k in names}
    return cls(**{**values, **extra})
