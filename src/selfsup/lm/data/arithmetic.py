"""An offline, reproducible stand-in for human labelers: a gold preference and noisy rankers.

RLHF needs people who rank a model's answers. Here a programmatic *gold* score plays the
people's true preference on a task a small model can learn -- adding two numbers -- and
simulated labelers rank K answers from the gold score with noise and ties, writing the same
``"D > C > A = B"`` strings a labeling tool would. The reward model only ever sees those
rankings, so it is a *proxy* for the gold score, and optimising the proxy too hard can lower the
gold score (reward over-optimisation), which the pipeline can measure because the gold is known.

Gold score of an answer to "What is a plus b?":
- +1 if the first whole number in the answer is a + b (the verifiable part);
- +0.5 for the house style: the answer is exactly one sentence ending in "." of at most
  ``STYLE_MAX_CHARS`` characters (terse beats rambling);
- -0.5 if the answer is empty.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfsup.core.errors import SelfsupError
from selfsup.lm.losses.preference import format_ranking

STYLE_MAX_CHARS = 20
PHRASINGS = ("What is {a} plus {b}?", "Add {a} and {b}.", "{a} + {b} = ?", "Compute {a} plus {b}.")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    prompt: str

    @property
    def answer(self) -> int:
        return self.a + self.b


def problems(n: int, seed: int, max_operand: int = 50) -> list[Problem]:
    """n addition prompts with operands in [0, max_operand], in varied phrasings."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(0, max_operand + 1, 2))
        out.append(Problem(a, b, PHRASINGS[rng.integers(len(PHRASINGS))].format(a=a, b=b)))
    return out


def demonstration(problem: Problem, rng: np.random.Generator | None = None) -> str:
    """An answer written for the supervised fine-tuning set.

    Without `rng`: the careful labeler's terse, right answer. With it, demonstrators vary as
    people do: half write the terse answer, a third ramble (right, but off the house style) and
    the rest are sloppy (terse, but the sum is off by 1 to 10). SFT imitates that mixture; the
    reward model and PPO are what can move the policy past it.
    """
    if rng is None:
        return f"The answer is {problem.answer}."
    kind = rng.random()
    if kind < 0.5:
        return f"The answer is {problem.answer}."
    if kind < 0.85:
        return f"Let me add {problem.a} and {problem.b}. That makes {problem.answer}."
    off = int(rng.integers(1, 11))
    wrong = (
        problem.answer - off
        if rng.random() < 0.5 and problem.answer >= off
        else problem.answer + off
    )
    return f"The answer is {wrong}."


def write_task(
    folder: str | Path,
    seed: int = 0,
    n_sft: int = 2000,
    n_prompts: int = 512,
    max_operand: int = 50,
) -> dict:
    """The files of the offline RLHF pipeline: corpus.txt (pretraining), sft.jsonl
    (demonstrations), label.jsonl (prompts whose sampled answers the simulated labelers rank),
    rl.jsonl (PPO prompts) and eval.jsonl (held-out prompts for the gold/proxy/KL report).
    Prompt records carry `a` and `b`, from which the gold score is computed. fewshot.jsonl holds
    held-out prompts with the careful labeler's answer, for `selfsup lm icl few-shot`.
    Operands are drawn from 0..max_operand (smaller: fewer sums for a small model to learn)."""
    if max_operand < 1:
        raise SelfsupError(f"--max-operand must be at least 1, got {max_operand}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (folder / "corpus.txt").write_text(pretraining_text(20 * n_sft, seed, max_operand))
    files = {"corpus.txt": 20 * n_sft}
    sets = {
        "sft.jsonl": problems(n_sft, seed + 1, max_operand),
        "label.jsonl": problems(n_prompts, seed + 2, max_operand),
        "rl.jsonl": problems(n_prompts, seed + 3, max_operand),
        "eval.jsonl": problems(n_prompts // 2, seed + 4, max_operand),
        "fewshot.jsonl": problems(n_prompts // 2, seed + 5, max_operand),
    }
    for name, items in sets.items():
        lines = []
        for p in items:
            record = {"prompt": p.prompt, "a": p.a, "b": p.b}
            if name == "sft.jsonl":
                record["completion"] = demonstration(p, rng)
            elif name == "fewshot.jsonl":
                record["completion"] = demonstration(p)
            lines.append(json.dumps(record))
        (folder / name).write_text("\n".join(lines) + "\n")
        files[name] = len(items)
    return files


def problem_of(record: dict) -> Problem:
    """The Problem behind a prompt record written by `write_task`."""
    try:
        return Problem(int(record["a"]), int(record["b"]), str(record.get("prompt", "")))
    except (KeyError, TypeError, ValueError):
        raise SelfsupError(
            "--gold arithmetic needs integer fields 'a' and 'b' in every prompt record "
            "(files from `selfsup lm arithmetic` have them)"
        ) from None


def pretraining_text(n: int, seed: int, max_operand: int = 50) -> str:
    """Plain lines about sums (no chat markers): the corpus of the pretraining stage. It holds
    the task's questions and answer styles as ordinary text, so that a character-level
    tokenizer trained on it covers every later stage."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(0, max_operand + 1, 2))
        question = PHRASINGS[rng.integers(len(PHRASINGS))].format(a=a, b=b)
        statements = [
            f"{a} plus {b} is {a + b}.",
            f"The sum of {a} and {b} is {a + b}.",
            f"{question} The answer is {a + b}.",
            f"{question} Let me add {a} and {b}. That makes {a + b}.",
        ]
        lines.append(statements[rng.integers(len(statements))])
    return "\n".join(lines) + "\n"


def gold_score(problem: Problem, response: str) -> float:
    """The true preference (see the module docstring)."""
    text = response.strip()
    if not text:
        return -0.5
    number = re.search(r"-?\d+", text)
    score = 1.0 if number is not None and int(number.group()) == problem.answer else 0.0
    one_sentence = text.endswith(".") and text.count(".") == 1
    if one_sentence and len(text) <= STYLE_MAX_CHARS:
        score += 0.5
    return score


def labeler_scores(
    gold: Sequence[float], rng: np.random.Generator, noise: float = 0.2, resolution: float = 0.25
) -> list[float]:
    """What one labeler perceives: gold plus Gaussian noise, rounded to `resolution`."""
    noisy = np.asarray(gold, dtype=float) + rng.normal(0.0, noise, len(gold))
    return [float(v) for v in np.round(noisy / resolution) * resolution]


def simulated_ranking(
    gold: Sequence[float], rng: np.random.Generator, noise: float = 0.2, resolution: float = 0.25
) -> str:
    """A labeler's ranking of K answers from `labeler_scores` (equal rounded scores are ties), as
    a ``"D > C > A = B"`` string."""
    return format_ranking(labeler_scores(gold, rng, noise, resolution))
