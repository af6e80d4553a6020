"""Verifiable rewards for the arithmetic task (`selfsup lm arithmetic`), written as TRL reward
functions: each takes the batch's prompts and completions (and the prompt file's other fields
by name, here `a` and `b`) and returns one float per completion, or None for "no opinion".

    selfsup lm grpo --policy SFT_RUN --prompts task/rl.jsonl --gold arithmetic \\
        --reward-fn docs/examples/arithmetic_rewards.py:correct \\
        --reward-fn docs/examples/arithmetic_rewards.py:one_short_sentence \\
        --reward-weights 1,1 --out runs/grpo-fns

Together (weights 1, 1) they are the task's gold score: 1 for the right sum, +0.5 for the house
style (one sentence, at most 20 characters), -0.5 for an empty answer. `short` is a length
reward: it prefers answers of fewer characters. The same functions work unchanged with TRL's
GRPOTrainer (prompts given as strings, or as message lists for conversational data).
"""

import re

MAX_CHARS = 20  # the house style's longest answer (selfsup.lm.data.arithmetic.STYLE_MAX_CHARS)


def _text(completion):
    """The answer's text: a string, or TRL's conversational [{"role": ..., "content": ...}]."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def correct(prompts, completions, a, b, **kwargs):
    """1.0 when the first whole number of the answer is a + b, else 0.0 (None without a, b)."""
    rewards = []
    for completion, x, y in zip(completions, a, b, strict=True):
        if x is None or y is None:
            rewards.append(None)  # not an arithmetic prompt: no opinion
            continue
        number = re.search(r"-?\d+", _text(completion))
        rewards.append(1.0 if number and int(number.group()) == int(x) + int(y) else 0.0)
    return rewards


def one_short_sentence(completions, **kwargs):
    """0.5 for one sentence of at most MAX_CHARS characters, -0.5 for an empty answer, else 0."""
    rewards = []
    for completion in completions:
        text = _text(completion).strip()
        if not text:
            rewards.append(-0.5)
        elif text.endswith(".") and text.count(".") == 1 and len(text) <= MAX_CHARS:
            rewards.append(0.5)
        else:
            rewards.append(0.0)
    return rewards


def short(completions, **kwargs):
    """A length reward: minus the answer's length in characters over 10 (shorter is better)."""
    return [-len(_text(c).strip()) / 10 for c in completions]
