"""Reward-model losses from human (or simulated) rankings: the Bradley–Terry pairwise loss.

A labeler ranks K completions of one prompt, e.g. ``"D > C > A = B"`` (letters name the
completions in order, ``=`` is a tie). Every strictly ordered pair (winner, loser) gives the term
-log σ(r_w - r_l); ties give none. As in InstructGPT, all pairs of one prompt stay in one batch
element: the loss of a prompt is the mean over its pairs, and the batch loss the mean over
prompts, so a prompt with many completions does not outweigh the others.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.core.errors import SelfsupError

LETTERS = string.ascii_uppercase


def parse_ranking(ranking: str, k: int) -> list[list[int]]:
    """Tiers of completion indices, best first: ``"D > C > A = B"`` -> [[3], [2], [0, 1]].

    Every one of the k completions (letters A, B, ... in order) must appear exactly once.
    """
    if not 1 <= k <= len(LETTERS):
        raise SelfsupError(f"a ranking needs 1 to {len(LETTERS)} completions, got {k}")
    allowed = LETTERS[:k]
    if not re.fullmatch(r"\s*[A-Z](\s*[>=]\s*[A-Z])*\s*", ranking):
        raise SelfsupError(
            f"ranking {ranking!r}: expected letters joined by '>' or '=', like 'D > C > A = B'"
        )
    tiers = [[LETTERS.index(c) for c in re.findall(r"[A-Z]", tier)] for tier in ranking.split(">")]
    seen = [i for tier in tiers for i in tier]
    if sorted(seen) != list(range(k)):
        unknown = sorted({LETTERS[i] for i in seen} - set(allowed))
        missing = sorted(set(allowed) - {LETTERS[i] for i in seen})
        repeated = sorted({LETTERS[i] for i in seen if seen.count(i) > 1})
        problems = [
            f"{what} {', '.join(letters)}"
            for what, letters in (
                ("unknown", unknown),
                ("missing", missing),
                ("repeated", repeated),
            )
            if letters
        ]
        raise SelfsupError(
            f"ranking {ranking!r} of {k} completions ({'/'.join(allowed)}): " + "; ".join(problems)
        )
    return tiers


def ranking_pairs(ranking: str | Sequence[Sequence[int]], k: int) -> list[tuple[int, int]]:
    """All (winner, loser) index pairs a ranking orders strictly; tied completions give none."""
    tiers = parse_ranking(ranking, k) if isinstance(ranking, str) else ranking
    return [
        (w, l)
        for t, better in enumerate(tiers)
        for worse in tiers[t + 1 :]
        for w in better
        for l in worse
    ]


def pair_agreement(
    ranking: str | Sequence[Sequence[int]], scores: Sequence[float]
) -> tuple[float, int]:
    """(credit, pairs) over the pairs that `ranking` orders strictly: credit 1 where `scores`
    order a pair the same way, 1/2 where they tie it (a coin flip), 0 where they reverse it."""
    pairs = ranking_pairs(ranking, len(scores))
    credit = sum(
        1.0 if scores[w] > scores[l] else 0.5 if scores[w] == scores[l] else 0.0 for w, l in pairs
    )
    return credit, len(pairs)


def format_ranking(scores: Sequence[float]) -> str:
    """Ranking string of scores, higher first, ties for equals: [1, 3, 1, 2] -> 'B > D > A = C'."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    out = LETTERS[order[0]]
    for prev, i in zip(order, order[1:], strict=False):
        out += (" = " if scores[i] == scores[prev] else " > ") + LETTERS[i]
    return out


def pairwise_ranking_loss(rewards: Tensor, pairs: Tensor, prompt_of_pair: Tensor) -> Tensor:
    """Mean over prompts of the mean over their pairs of -log σ(r_w - r_l).

    rewards: R scalar rewards (all completions of the batch, flattened); pairs: P×2 indices into
    rewards (winner, loser); prompt_of_pair: P indices of the prompt each pair comes from.
    """
    if pairs.numel() == 0:
        raise SelfsupError("no strictly ordered pair in the batch: every ranking is a full tie")
    margin = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]
    per_pair = -F.logsigmoid(margin)
    prompts, index = torch.unique(prompt_of_pair, return_inverse=True)
    sums = torch.zeros(len(prompts), dtype=per_pair.dtype, device=per_pair.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, index, per_pair)
    counts.index_add_(0, index, torch.ones_like(per_pair))
    return (sums / counts).mean()


def pairwise_accuracy(rewards: Tensor, pairs: Tensor) -> float:
    """Fraction of pairs whose winner gets the higher reward, a tie counting half, as
    `pair_agreement` scores the labelers' own agreement: two identical answers that a noisy
    labeler happened to order are a coin flip for any reward model, not its error."""
    winner, loser = rewards[pairs[:, 0]], rewards[pairs[:, 1]]
    return ((winner > loser).float() + 0.5 * (winner == loser).float()).mean().item()


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation (Rafailov et al., 2023) over P pairs: (loss, chosen
    rewards, rejected rewards), the loss the mean of -log σ(β·((π_c - ref_c) - (π_r - ref_r)))
    with π and ref the answers' summed log-probabilities under the policy and the frozen
    reference. The implicit rewards β·(π - ref) are returned detached, for accuracies."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()
