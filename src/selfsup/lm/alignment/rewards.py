"""Reward functions a user writes, for `selfsup lm grpo --reward-fn FILE.py:NAME`, called as TRL's
GRPOTrainer calls them, so that a TRL user's functions work unchanged:

    NAME(prompts=[...], completions=[...], completion_ids=[...], **columns) -> list[float | None]

one entry per answer (each prompt repeated G times). A prompt record with a ``prompt`` string is
TRL's standard format: its prompt and completion are strings. A ``messages`` record is TRL's
conversational format: its prompt is the message list, its completion
``[{"role": "assistant", "content": text}]``. Every other field of the prompt file is passed as
a keyword of the same name, a list with the record's value per answer (None where a record
lacks it). None (or NaN) is "no opinion": the weighted sum skips it (TRL's nansum).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selfsup.core.errors import SelfsupError
from selfsup.lm.data.conversations import Message

PROMPT_KEYS = ("prompt", "messages", "completion", "completion_ids", "prompts", "completions")


class RewardFnError(SelfsupError):
    """A reward function that raised or returned what is not one number (or None) per answer."""


@dataclass(frozen=True)
class RewardFn:
    """A user's reward function and how it was named (``FILE.py:NAME``)."""

    spec: str
    fn: Callable[..., Any]

    @property
    def name(self) -> str:
        return self.spec.rpartition(":")[2]


def load_reward_fns(specs: str) -> list[RewardFn]:
    """The functions of a comma list of ``FILE.py:NAME``, each file imported by its path (as
    user code: it runs); one line for a file that is missing or does not import, or a NAME it
    lacks or that is not callable."""
    out, modules = [], {}
    for spec in (s.strip() for s in specs.split(",") if s.strip()):
        path, _, name = spec.rpartition(":")
        if not path or not name:
            raise SelfsupError(f"--reward-fn {spec!r}: expected FILE.py:NAME")
        file = Path(path).expanduser().resolve()
        if file not in modules:
            modules[file] = _import(file, spec)
        fn = getattr(modules[file], name, None)
        if not callable(fn):
            what = "no function" if fn is None else "a non-callable"
            raise SelfsupError(f"--reward-fn {spec}: {path} has {what} {name!r}")
        out.append(RewardFn(spec, fn))
    return out


def _import(file: Path, spec: str) -> Any:
    if not file.is_file():
        raise SelfsupError(f"--reward-fn {spec}: no such file {file}")
    module_name = f"selfsup_reward_fn_{abs(hash(str(file)))}"
    loader = importlib.util.spec_from_file_location(module_name, file)
    if loader is None or loader.loader is None:
        raise SelfsupError(f"--reward-fn {spec}: {file} is not a Python file")
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up
    try:
        loader.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise SelfsupError(f"--reward-fn {spec}: {file} does not import: {_one_line(e)}") from None
    return module


def reward_weights(text: str, count: int) -> list[float]:
    """--reward-weights: a comma list of `count` numbers (empty: all 1)."""
    if not text.strip():
        return [1.0] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise SelfsupError(f"--reward-weights {text!r}: expected a comma list of numbers") from None
    if len(weights) != count or not all(math.isfinite(w) for w in weights):
        raise SelfsupError(
            f"--reward-weights {text!r}: expected {count} finite numbers, one per reward (the "
            "reward model or gold first when it scores, then each --reward-fn in order)"
        )
    return weights


def trl_inputs(
    records: Sequence[dict[str, Any]], conversations: Sequence[Sequence[Message]]
) -> tuple[list[Any], list[bool], dict[str, list[Any]]]:
    """(prompts, conversational flags, columns) of a prompt file as TRL hands them over: the
    ``prompt`` string, or the ``messages`` list (conversational); the other fields by name."""
    conversational = ["prompt" not in r or not isinstance(r["prompt"], str) for r in records]
    prompts = [
        list(c) if conv else r["prompt"]
        for r, c, conv in zip(records, conversations, conversational, strict=True)
    ]
    keys = dict.fromkeys(k for r in records for k in r if k not in PROMPT_KEYS)
    columns = {k: [r.get(k) for r in records] for k in keys}
    return prompts, conversational, columns


def call_reward_fn(
    reward: RewardFn,
    prompts: list[Any],
    answers: list[str],
    conversational: list[bool],
    completion_ids: list[list[int]],
    columns: dict[str, list[Any]],
) -> Tensor:
    """The function's rewards of B answers as a float tensor (NaN for None or NaN); raises
    RewardFnError for an exception, a wrong length or a value that is not a number."""
    completions = [
        [{"role": "assistant", "content": a}] if conv else a
        for a, conv in zip(answers, conversational, strict=True)
    ]
    try:
        values = reward.fn(
            prompts=prompts, completions=completions, completion_ids=completion_ids, **columns
        )
    except Exception as e:
        raise RewardFnError(f"reward function {reward.spec} raised {_one_line(e)}") from None
    try:
        values = list(values)
    except TypeError:
        raise RewardFnError(
            f"reward function {reward.spec} returned {_short(values)}, not a list of rewards"
        ) from None
    if len(values) != len(answers):
        raise RewardFnError(
            f"reward function {reward.spec} returned {len(values)} rewards for {len(answers)} "
            "answers (one per answer)"
        )
    out = []
    for i, v in enumerate(values):
        number = _number(v)
        if number is None or math.isinf(number):
            raise RewardFnError(
                f"reward function {reward.spec} returned {_short(v)} for answer {i} "
                f"({_short(answers[i])}): expected a finite number or None"
            )
        out.append(number)
    return torch.tensor(out, dtype=torch.float32)


def _number(v: Any) -> float | None:
    """v as a float (None and NaN: NaN), or None when it is not a number."""
    if v is None:
        return math.nan
    if isinstance(v, (str, bytes)):
        return None
    try:
        return float(v)
    except (TypeError, ValueError, RuntimeError):
        return None


def combine(rewards: Tensor, weights: Sequence[float]) -> Tensor:
    """B×K rewards of K sources -> B weighted sums, NaN skipped (TRL's nansum); NaN where no
    source scored the answer (such an answer gets advantage 0, see `group_advantages`)."""
    w = torch.tensor(list(weights), dtype=rewards.dtype, device=rewards.device)
    total = (rewards * w).nansum(1)
    return torch.where(rewards.isnan().all(1), torch.nan, total)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
