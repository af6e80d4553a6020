"""Registries of methods (and stages): names -> import paths, and each one's own options read
from its file without importing it.

Each method file declares its options as a dataclass named `Options` beside its code:

    @dataclass
    class Options:
        temperature: float = option(0.5, "InfoNCE temperature", check=">0")

Training imports that dataclass as usual. The command line reads the same declaration from the
file's source (Python's `ast`), because importing a method imports torch and Lightning, which
takes seconds; `selfsup pretrain METHOD --help` and its usage errors stay instant that way. The
defaults, help texts and checks must therefore be literals (tests/test_method_options.py checks
that what is read here equals the imported dataclass for every method).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from dataclasses import dataclass
from functools import cache
from importlib import import_module
from typing import Any

from selfsup.core.errors import SelfsupError


@dataclass(frozen=True)
class OptionSpec:
    """One field of a method's Options as the CLI needs it."""

    name: str
    type: str  # the annotation as written: "float", "int | None", "bool", "str"
    default: Any
    help: str
    metadata: dict[str, Any]


@cache
def source_tree(module: str) -> ast.Module:
    """The syntax tree of `module`'s source, read without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find the module {module}")
    with open(spec.origin, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=spec.origin)


@cache
def options_in(module: str, name: str = "Options") -> tuple[OptionSpec, ...]:
    """The fields of the dataclass `name` (default `Options`) declared in `module`'s source, in
    a dataclass's order (none if it has none)."""
    tree = source_tree(module)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            fields: dict[str, OptionSpec] = {}
            for base in reversed(node.bases):  # `class Options(SimCLROptions)`: bases first
                fields.update((f.name, f) for f in _base_options(tree, module, ast.unparse(base)))
            for item in node.body:  # an override keeps its base's place, as in a dataclass
                if isinstance(item, ast.AnnAssign):
                    fields[item.target.id] = _field(item)  # type: ignore[attr-defined]
            return tuple(fields.values())
        if isinstance(node, ast.ImportFrom):  # `from selfsup.image.methods.simclr import Options`
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return options_in(node.module or "", alias.name)
    return ()


def _base_options(tree: ast.Module, module: str, name: str) -> tuple[OptionSpec, ...]:
    """The fields of base class `name`: declared in `module` itself, or imported into it."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return options_in(module, name)
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return options_in(node.module or "", alias.name)
    raise ValueError(f"Options derives from {name}, which is not an imported options dataclass")


def _field(node: ast.AnnAssign) -> OptionSpec:
    name = node.target.id  # type: ignore[attr-defined]
    call = node.value
    if not (isinstance(call, ast.Call) and ast.unparse(call.func) == "option"):
        raise ValueError(f"Options.{name}: declare it as `{name}: TYPE = option(default, help)`")
    default = ast.literal_eval(call.args[0])
    help_text = ast.literal_eval(call.args[1]) if len(call.args) > 1 else ""
    metadata = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
    return OptionSpec(name, ast.unparse(node.annotation), default, help_text, metadata)


def build_options(owner: str, values: dict[str, Any], cls: type) -> Any:
    """`cls` (an Options dataclass of `owner`, a method or stage) from `values`, checked; an
    option it does not have is a one-line error."""
    from selfsup.core.config import check_fields

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        own = ", ".join(sorted(names)) or "none"
        raise SelfsupError(
            f"{', '.join(unknown)} is not an option of {owner} (its own options: {own})"
        )
    options = cls(**values)
    check_fields(options)
    return options


class Registry(dict[str, str]):
    """Names -> "module:Class" import paths: listing names and reading their options imports
    nothing; `load` imports the one that is used."""

    def load(self, name: str) -> Any:
        module, cls = self[name].split(":")
        return getattr(import_module(module), cls)

    def options(self, name: str) -> tuple[OptionSpec, ...]:
        """`name`'s Options fields, read from its source (none for a name not registered)."""
        return options_in(self[name].split(":")[0]) if name in self else ()

    def option_names(self, name: str) -> set[str]:
        return {f.name for f in self.options(name)}

    def all_option_names(self) -> set[str]:
        """Every entry's option names (an old run's config.yaml holds them all)."""
        return set().union(*(self.option_names(name) for name in self))

    def about(self, name: str) -> dict[str, Any]:
        """The literal class attributes of `name`'s class (its `help`, `description`, `entry`,
        `defaults`, `presets`, ...), read from its source."""
        return dict(class_literals(*self[name].split(":")))

    def check(self, name: str, values: dict[str, Any]) -> None:
        """One line for the first of `values` outside the range `name`'s Options declare
        (`check=`), read from the source: a usage mistake is told before torch is imported."""
        from selfsup.core.config import check_fields, option, type_of

        specs = [s for s in self.options(name) if s.name in values]
        fields = [(s.name, type_of(s.type), option(s.default, s.help, **s.metadata)) for s in specs]
        check_fields(dataclasses.make_dataclass("Options", fields)(**values))

    def build(self, name: str, values: dict[str, Any]) -> Any:
        """`name`'s Options from `values`, imported from its module (training is starting)."""
        return build_options(name, values, self.load(name).Options)


@cache
def class_literals(module: str, cls: str) -> tuple[tuple[str, Any], ...]:
    """The `NAME = literal` attributes of class `cls` in `module`'s source (others skipped)."""
    for node in source_tree(module).body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            found = []
            for item in node.body:
                if isinstance(item, ast.Assign) and isinstance(item.targets[0], ast.Name):
                    try:
                        found.append((item.targets[0].id, ast.literal_eval(item.value)))
                    except ValueError:  # not a literal: only importing the class gives it
                        continue
            return tuple(found)
    raise ValueError(f"{module} declares no class {cls}")
