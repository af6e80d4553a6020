"""JSON Lines: one JSON object a line, errors naming the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selfsup.core.errors import SelfsupError


def json_objects(
    text: str, path: str | Path, at: str = "{path}:{line}"
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of `text`, the contents of `path`; a line
    that is not a JSON object stops with one line that names it by `at`.

    Lines end at "\\n" only: str.splitlines would also cut at U+2028, U+0085 etc., which JSON
    strings may hold unescaped.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = at.format(path=path, line=number)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SelfsupError(f"{where}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise SelfsupError(f"{where}: JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise SelfsupError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield number, record
