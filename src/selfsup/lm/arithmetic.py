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

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from selfsup.losses.preference import format_ranking

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


def demonstration(problem: Problem) -> str:
    """What a careful labeler writes for the supervised fine-tuning set."""
    return f"The answer is {problem.answer}."


def pretraining_text(n: int, seed: int, max_operand: int = 50) -> str:
    """Plain sentences about sums (no chat markers): the corpus of the pretraining stage."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(0, max_operand + 1, 2))
        lines.append(
            rng.choice(
                [
                    f"{a} plus {b} is {a + b}.",
                    f"If you add {a} and {b} you get {a + b}.",
                    f"The sum of {a} and {b} is {a + b}.",
                ]
            )
        )
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


def simulated_ranking(
    gold: Sequence[float], rng: np.random.Generator, noise: float = 0.2, resolution: float = 0.25
) -> str:
    """A labeler's ranking of K answers: gold plus Gaussian noise, rounded to `resolution` (equal
    rounded scores are ties), as a ``"D > C > A = B"`` string."""
    noisy = np.asarray(gold, dtype=float) + rng.normal(0.0, noise, len(gold))
    return format_ranking(list(np.round(noisy / resolution) * resolution))
