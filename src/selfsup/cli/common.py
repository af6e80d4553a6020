"""What every `selfsup` command shares, below the commands themselves (`selfsup.cli.main` and
`selfsup.cli.lm` import it; it imports neither): the parser class, argument types, the house's
shared options, usage errors and the one-line error, the walk to a command's sub-parser, and
the printed results of an evaluation. Torch-free, so that `--help` stays instant."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from selfsup.core.config import check_range, seed_type
from selfsup.core.errors import SelfsupError


class UsageError(Exception):
    """A command line argparse rejects; `main` prints it as one line with a --help hint."""


class Parser(argparse.ArgumentParser):
    """argparse without the 40-line usage dump on errors, and without abbreviated options
    (`--fraction` must not silently mean `--fractions`). Sub-parsers inherit the class.
    `add_argument(..., check=RULE)` declares an option's range as a config field's `check=`
    does; a value outside it is the same one line (`selfsup.core.config.check_range`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, check: str | None = None, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        action.check = check  # type: ignore[attr-defined]
        return action

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            if getattr(action, "check", None) and value is not None:
                check_range(value, action.check, action.option_strings[-1])
        return namespace, extras

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def about(add: Any) -> dict[str, str | None]:
    """A command's help (the first paragraph of its `_add_` function's docstring) and its
    description (the rest) for `sub.add_parser`."""
    first, _, rest = (add.__doc__ or "").partition("\n\n")
    return {"help": " ".join(first.split()), "description": " ".join(rest.split()) or None}


RUN_HELP = "run directory written by `selfsup pretrain`"
IMAGES_HELP = "an image file, or a folder (PATH or folder:PATH) searched recursively"

# The house's one vocabulary: each shared option once, by name -> (its flags, argparse settings).
VOCABULARY: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "run": (("run",), {"help": RUN_HELP}),
    "images": (("images",), {"help": IMAGES_HELP}),
    "data": (("--data",), {}),
    "split": (("--split",), {"default": "test", "choices": ["train", "test"]}),
    "data_dir": (("--data-dir",), {"help": "root of torchvision datasets"}),
    "download": (("--download",), {"action": "store_true", "help": "download a missing dataset"}),
    "limit": (("--limit",), {"type": positive_int}),
    "batch_size": (("--batch-size",), {"type": positive_int, "default": 256}),
    "device": (("--device",), {"default": "auto"}),
    "seed": (("--seed",), {"type": seed_type, "default": 0}),
    "out": (("--out",), {}),
    "output": (("-o", "--output"), {}),
}


def add_options(parser: Any, **given: bool | str | dict[str, Any]) -> None:
    """Add shared options of VOCABULARY to `parser`, in the order given: `name=True` as
    declared, `name="text"` with that help, `name={...}` with these settings over the declared."""
    for name, how in given.items():
        flags, settings = VOCABULARY[name]
        extra = {"help": how} if isinstance(how, str) else how if isinstance(how, dict) else {}
        parser.add_argument(*flags, **{**settings, **extra})


def output_file(path: str | None) -> Path | None:
    """Check early (before any work) that a file can be written at `path`; creates its folder."""
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise SelfsupError(f"{out} is a folder; give a file name to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SelfsupError(f"{out}: cannot create its folder {out.parent} ({e.strerror})") from None
    if not os.access(out.parent, os.W_OK):
        raise SelfsupError(f"{out}: its folder {out.parent} is not writable")
    return out


def command_path(
    parser: argparse.ArgumentParser, argv: list[str]
) -> tuple[list[str], argparse.ArgumentParser, str | None]:
    """(the command words of `argv`, the sub-parser they lead to, the first word after them)."""
    words, current = [], parser
    for word in (a for a in argv if not a.startswith("-")):
        sub = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            return words, current, word
        words.append(word)
        current = sub.choices[word]
    return words, current, None


def command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The sub-parser of the command `argv` names (`selfsup lm pretrain gpt` -> gpt's)."""
    return command_path(parser, argv)[1]


def help_hint(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """`selfsup pretrain simclr --help`: the command words of `argv` that the parser knows (a
    positional with choices, such as pretrain's METHOD, counts when valid)."""
    words, current, after = command_path(parser, argv)
    chooser = next((a for a in current._actions if a.choices and not a.option_strings), None)
    if after is not None and chooser is not None and after in chooser.choices:
        words.append(after)
    return " ".join(["selfsup", *words, "--help"])


_BUILDER: list[Callable[[], argparse.ArgumentParser]] = []


def provide_parser(build: Callable[[], argparse.ArgumentParser]) -> None:
    """Name the builder of the whole `selfsup` parser (`selfsup.cli.main` does, on import)."""
    _BUILDER[:] = [build]


def build_parser() -> argparse.ArgumentParser:
    """A fresh `selfsup` parser, for a command that parses its line again with new defaults
    (`selfsup lm`'s --preset and --config). Its builder sits above the commands, and so above
    this module: it hands itself down (`provide_parser`) rather than being imported here."""
    if not _BUILDER:
        raise RuntimeError("the selfsup parser is built by selfsup.cli.main: import it first")
    return _BUILDER[0]()


def fail(message: str) -> int:
    """Print one error line (newlines inside a message are folded) and return exit code 2."""
    print(f"selfsup: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def print_results(results: dict) -> None:
    """What `selfsup evaluate` (and `selfsup demo`) print of an evaluation's results."""
    print(f"\n{results['data']}: {results['train_size']} train / {results['test_size']} test")
    print(f"linear probe (all labels): {100 * results['linear_probe']:.1f}%")
    print(f"kNN (all labels):          {100 * results['knn']:.1f}%")
    if "kmeans" in results:
        km = results["kmeans"]
        print(f"k-means:                   NMI {km['nmi']:.3f}, accuracy {100 * km['acc']:.1f}%")
    print(
        f"\nfew-label accuracy (%) of a {results['probe']} probe on frozen features, mean ± std "
        "over label subsets:\n" + results["table"]
    )
    if any(row["method"] == "supervised" for row in results["few_label"]):
        print(f"({results['supervised_rule']})")
    if "shift" in results:
        from selfsup.image.evaluation.shift import format_shift_table

        print(
            "\naccuracy (%) under distribution shift (probe trained on clean labels; severities "
            "1/2/3):\n" + format_shift_table(results["shift"], tuple(results["shift_corruptions"]))
        )
    print(f"\nresults and plots: {results['out']}")
    if results.get("report"):
        print(f"report: {results['report']}")
