"""The language pretraining methods, registered by name: `selfsup lm pretrain KIND`.

As the image half's METHODS: a name maps to "module:Class", and a kind's file declares its
`Options` dataclass beside its class. The class states as literals what the command line shows
before anything is imported: `help`, `defaults` (its own defaults of LMConfig's options),
`presets`, and `entry` for a kind with a loop of its own (word2vec: the named function of its
file takes its Options, which are then its whole configuration); a kind without `entry` is a
`selfsup.lm.models.base.LanguageModule` trained by `pretrain_lm` with LMConfig beside its
Options. All of it is read from the source (`ast`): listing, `--help` and usage errors import no
torch. A new kind is its file plus one line below.
"""

from __future__ import annotations

import ast
import dataclasses
from functools import cache
from typing import Any

from selfsup.core.config import check_fields, option, type_of
from selfsup.core.registry import Registry, source_tree

ABOUT = ("help", "defaults", "presets", "entry")  # the class attributes the CLI reads


class Kinds(Registry):
    """A Registry whose classes also state their `help`, `defaults`, `presets` and `entry`."""

    def about(self, name: str) -> dict[str, Any]:
        """`name`'s literal class attributes among ABOUT, read from its source."""
        return dict(_class_literals(*self[name].split(":")))

    def check(self, name: str, values: dict[str, Any]) -> None:
        """One line for the first of `values` outside the range `name`'s Options declare
        (`check=`), read from the source: a usage mistake is told before torch is imported."""
        specs = [s for s in self.options(name) if s.name in values]
        fields = [(s.name, type_of(s.type), option(s.default, s.help, **s.metadata)) for s in specs]
        check_fields(dataclasses.make_dataclass("Options", fields)(**values))


@cache
def _class_literals(module: str, cls: str) -> tuple[tuple[str, Any], ...]:
    for node in source_tree(module).body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return tuple(
                (item.targets[0].id, ast.literal_eval(item.value))
                for item in node.body
                if isinstance(item, ast.Assign)
                and isinstance(item.targets[0], ast.Name)
                and item.targets[0].id in ABOUT
            )
    raise ValueError(f"{module} declares no class {cls}")


PRETRAIN = Kinds(
    {
        "gpt": "selfsup.lm.models.gpt:GPTModule",
        "bert": "selfsup.lm.models.bert:BertModule",
        "word2vec": "selfsup.lm.models.word2vec:Word2Vec",
    }
)
