"""GRPO (Shao et al., 2024, DeepSeekMath) and its variants as pure functions: group-relative
advantages, the k3 estimate of the KL from the reference, and the clipped objective with that KL
as a loss term.

No value model: each prompt is answered G times, and an answer's advantage is its reward
standardised within its group, (r - mean) / (std + eps), the same for all its tokens.
Variants (TRL's names and formulas): `scale` group | batch | none (Dr GRPO: none), `loss_type`
grpo (per-answer token mean, then mean over answers) | bnpo (mean over the batch's tokens) |
dr-grpo (a constant normaliser, answers × max_new_tokens; Liu et al., 2025) | dapo (the tokens of
the whole generation batch per update; Yu et al., 2025), `clip_high` (DAPO's clip-higher) and
`importance` token | sequence (GSPO, Zheng et al., 2025: one ratio per answer, the exponential
of its mean per-token log-ratio).
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfsup.core.errors import SelfsupError

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr-grpo", "dapo")
IMPORTANCE = ("token", "sequence")


def nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """The unbiased standard deviation over the values that are not NaN (NaN below two)."""
    mean = x.nanmean() if dim is None else x.nanmean(dim, keepdim=True)
    count = (~x.isnan()).sum() if dim is None else (~x.isnan()).sum(dim, keepdim=True)
    squares = ((x - mean) ** 2).nansum() if dim is None else ((x - mean) ** 2).nansum(dim, True)
    return torch.where(count > 1, squares / (count - 1).clamp_min(1), torch.nan).sqrt()


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if group_size < 2 or rewards.numel() % group_size:
        raise SelfsupError(
            f"{rewards.numel()} rewards do not split into groups of {group_size} (at least 2)"
        )
    return rewards.float().reshape(-1, group_size)


def group_advantages(
    rewards: Tensor, group_size: int, eps: float = 1e-4, scale: str = "group"
) -> Tensor:
    """(r - group mean) / (std + eps) for rewards laid out group by group (B = n·G); the std is
    the unbiased one of the group (`scale="group"`, as TRL), of the whole batch ("batch"), or
    none at all ("none": r - group mean). A NaN reward (no reward source scored the answer) is
    left out of its group's mean and std and gets advantage 0; a group of equal rewards gets 0."""
    if scale not in SCALES:
        raise SelfsupError(f"scale {scale!r}: expected one of {', '.join(SCALES)}")
    groups = _groups(rewards, group_size)
    adv = groups - groups.nanmean(1, keepdim=True)
    if scale != "none":
        adv = adv / ((nanstd(groups, 1) if scale == "group" else nanstd(groups)) + eps)
    return adv.nan_to_num(nan=0.0).reshape(-1)


def flat_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Per group: True where its scored rewards do not spread (all equal, or fewer than two
    scored), so that every advantage in it is 0 (DAPO's dynamic sampling leaves these out)."""
    return ~(nanstd(_groups(rewards, group_size), 1).squeeze(1) > 0)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π || π_ref) from tokens sampled from π (Schulman's
    estimator, as DeepSeekMath and TRL use it): exp(d) - d - 1 with d = log π_ref - log π;
    never negative, unbiased, lower variance than -d."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def grpo_loss(
    logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, advantages: Tensor, mask: Tensor,
    clip: float = 0.2, beta: float = 0.04, *, loss_type: str = "grpo",
    clip_high: float | None = None, importance: str = "token", max_tokens: int | None = None,
    tokens: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """(loss, statistics) of B answers (B×T per-token log-probabilities, B advantages): per
    token -min(ρ·A, clip(ρ, 1 - clip, 1 + clip_high)·A) + β·k3, ρ = π / π_old per token (or,
    `importance="sequence"`, exp of the answer's mean log-ratio), aggregated by `loss_type`:
    grpo averages each answer's tokens, then the answers (DeepSeekMath's eq. 3); bnpo divides
    the sum over the batch's tokens by their count; dr-grpo by B·`max_tokens`; dapo by `tokens`
    (the generation batch's token count per update; default this batch's count)."""
    if loss_type not in LOSS_TYPES or importance not in IMPORTANCE:
        raise SelfsupError(
            f"loss type {loss_type!r} / importance sampling {importance!r}: expected one of "
            f"{', '.join(LOSS_TYPES)} / {', '.join(IMPORTANCE)}"
        )
    high = clip if clip_high is None else clip_high
    lengths = mask.sum(1).clamp_min(1)
    log_ratio = logprobs - old_logprobs
    if importance == "sequence":
        log_ratio = ((log_ratio * mask).sum(1) / lengths)[:, None]
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + high) * adv)
    kl = k3_kl(logprobs, ref_logprobs)
    per_token = (-surrogate + beta * kl) * mask
    if loss_type == "grpo":
        loss = (per_token.sum(1) / lengths).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / mask.sum().clamp_min(1)
    elif loss_type == "dr-grpo":
        if max_tokens is None:
            raise SelfsupError("the dr-grpo loss needs max_tokens (the longest answer)")
        loss = per_token.sum() / (len(mask) * max_tokens)
    else:
        loss = per_token.sum() / (mask.sum().clamp_min(1) if tokens is None else max(tokens, 1.0))
    clipped = ((ratio < 1 - clip) | (ratio > 1 + high)).float().expand_as(mask)
    stats = {
        "k3": ((kl * mask).sum(1) / lengths).mean().detach(),
        "clip": ((clipped * mask).sum() / mask.sum().clamp_min(1)).detach(),
    }
    return loss, stats
