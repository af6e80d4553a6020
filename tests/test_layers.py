"""The house's layers import only downward, and no module imports itself back through others.

core < engine < {image, lm} < reporting < {cli, api}: a module imports from its own layer or
below, and never across between image and lm. Every import of the source tree counts, inside
functions too (read with `ast`, so nothing is imported here); `import_module("...")` strings
in registries count as imports too. docs/design.md draws the same picture.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS = {"core": 0, "engine": 1, "image": 2, "lm": 2, "reporting": 3, "cli": 4, "api": 4}
TOP = 5  # selfsup/__init__.py and __main__.py: the public names, above everything

# Allowed edges that go against the rule, each with its reason. Keep this empty if you can.
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "selfsup").rglob("*.py"))}


def _known(name: str) -> str | None:
    """The selfsup module `name` refers to (a module, or the package holding a name)."""
    while name and name not in modules():
        name = name.rpartition(".")[0]
    return name or None


@cache
def imports_of(module: str) -> frozenset[str]:
    """Every selfsup module `module` imports, at the top, inside functions or by string."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules() else base for a in node.names
            ]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.split(":")[0]  # registry entries: "selfsup.x.y:Class"
            if text.startswith("selfsup.") and text in modules():
                names = [text]
        for name in names:
            if name == "selfsup" or name.startswith("selfsup."):
                known = _known(name)
                if known and known != module:
                    found.add(known)
    return frozenset(found)


def layer_of(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "selfsup", TOP
    return parts[1], LAYERS.get(parts[1], -1)


def test_every_module_sits_in_a_layer() -> None:
    loose = [m for m in modules() if layer_of(m)[1] < 0]
    assert not loose, f"modules outside the layers {sorted(LAYERS)}: {loose}"


def test_imports_go_only_downward_and_never_across_image_and_lm() -> None:
    wrong = []
    for module in modules():
        name, level = layer_of(module)
        for target in imports_of(module):
            other, other_level = layer_of(target)
            across = {name, other} == {"image", "lm"}
            if (other_level > level or across) and (module, target) not in ALLOWED:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_there_are_no_import_circles() -> None:
    """Tarjan's strongly connected components over the whole import graph: none has two
    modules (an `__init__` that imports its submodule, which imports the package back, counts)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in imports_of(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in modules():
        if module not in index:
            visit(module)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_checker_sees_imports_inside_functions_and_by_string(tmp_path: Path) -> None:
    """The walker itself: a function-level import and a registry string are both edges."""
    module = next(m for m in modules() if m.endswith("image.methods"))
    assert any(t.startswith("selfsup.image.methods.") for t in imports_of(module))  # strings
    api = imports_of("selfsup.api")
    assert any(t.startswith("selfsup.reporting") for t in api)  # imported inside evaluate()


@pytest.mark.parametrize("package", ["selfsup.core"])
def test_core_imports_without_torch(package: str) -> None:
    names = [m for m in modules() if m == package or m.startswith(package + ".")]
    code = "import sys\n" + "".join(f"import {m}\n" for m in names)
    code += "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"{package} imports {out.stdout.strip()}"
