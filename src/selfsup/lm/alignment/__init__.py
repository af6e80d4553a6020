"""The stages after pretraining, one file each, registered by name: `selfsup lm STAGE`.

A stage's file declares its `Options` dataclass (fields made with `option(default, help,
check=...)`; shared groups from `selfsup.lm.options`: EngineOptions, TuneConfig, PPOSettings,
OnlineOptions) and a `Stage` class naming its `help`, `description`, entry point (`entry`,
the function of the file that runs it) and closing lines (`summary`). The command line reads
the Options and the help from the file's source (`ast`), so listing and parsing stay free of
torch; a new stage is its file plus one line below.
"""

from __future__ import annotations

import ast

from selfsup.core.registry import Registry, source_tree


class Stages(Registry):
    """A Registry whose entries also name their `help` and `description` in their source."""

    def about(self, name: str) -> dict[str, str]:
        """The string attributes (`help`, `description`) of `name`'s class, read by `ast`."""
        return dict(_class_strings(*self[name].split(":")))


def _class_strings(module: str, cls: str) -> tuple[tuple[str, str], ...]:
    for node in source_tree(module).body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return tuple(
                (item.targets[0].id, item.value.value)
                for item in node.body
                if isinstance(item, ast.Assign)
                and isinstance(item.targets[0], ast.Name)
                and isinstance(item.value, ast.Constant)
                and isinstance(item.value.value, str)
            )
    raise ValueError(f"{module} declares no class {cls}")


ALIGN = Stages(
    {
        "sft": "selfsup.lm.alignment.sft:SFT",
        "reward": "selfsup.lm.alignment.reward:Reward",
        "rlhf": "selfsup.lm.alignment.rlhf:RLHF",
        "best-of-n": "selfsup.lm.alignment.best_of_n:BestOfN",
        "dpo": "selfsup.lm.alignment.dpo:DPO",
        "grpo": "selfsup.lm.alignment.grpo:GRPO",
        "simpo": "selfsup.lm.alignment.simpo:SimPO",
    }
)
