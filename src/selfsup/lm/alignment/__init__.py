"""The stages after pretraining, one file each, registered by name: `selfsup lm STAGE`.

A stage's file declares its `Options` dataclass (fields made with `option(default, help,
check=...)`; shared groups from `selfsup.lm.options`: EngineOptions, TuneConfig, PPOSettings,
OnlineOptions, OnlinePolicy) and a `Stage` class naming its `help`, `description`, entry point
(`entry`, the function of the file that runs it) and closing lines (`summary`). The command
line reads the Options and the help from the file's source (`ast`), so listing and parsing stay
free of torch; a new stage is its file plus one line below.
"""

from __future__ import annotations

from selfsup.core.registry import Registry

ALIGN = Registry(
    {
        "sft": "selfsup.lm.alignment.sft:SFT",
        "reward": "selfsup.lm.alignment.reward:Reward",
        "rlhf": "selfsup.lm.alignment.rlhf:RLHF",
        "best-of-n": "selfsup.lm.alignment.best_of_n:BestOfN",
        "dpo": "selfsup.lm.alignment.dpo:DPO",
        "grpo": "selfsup.lm.alignment.grpo:GRPO",
        "simpo": "selfsup.lm.alignment.simpo:SimPO",
        "kto": "selfsup.lm.alignment.kto:KTO",
        "distill": "selfsup.lm.alignment.gkd:GKD",
    }
)
