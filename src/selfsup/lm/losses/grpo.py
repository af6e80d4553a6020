"""GRPO (Shao et al., 2024, DeepSeekMath) as pure functions: group-relative advantages, the k3
estimate of the KL from the reference, and the clipped objective with that KL as a loss term.

No value model: each prompt is answered G times, and an answer's advantage is its reward
standardised within its group, (r - mean) / (std + eps), the same for all its tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfsup.core.errors import SelfsupError


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """(r - group mean) / (group std + eps) for rewards laid out group by group (B = n·G); the
    standard deviation is the unbiased one (as TRL's). A group of equal rewards gets 0."""
    if group_size < 2 or rewards.numel() % group_size:
        raise SelfsupError(
            f"{rewards.numel()} rewards do not split into groups of {group_size} (at least 2)"
        )
    groups = rewards.float().reshape(-1, group_size)
    mean, std = groups.mean(1, keepdim=True), groups.std(1, keepdim=True)
    return ((groups - mean) / (std + eps)).reshape(-1)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π || π_ref) from tokens sampled from π (Schulman's
    estimator, as DeepSeekMath and TRL use it): exp(d) - d - 1 with d = log π_ref - log π;
    never negative, unbiased, lower variance than -d."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip: float = 0.2,
    beta: float = 0.04,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, statistics) of B answers (B×T per-token log-probabilities, B advantages): per
    token -min(ρ·A, clip(ρ, 1 ± clip)·A) + β·k3, ρ = π / π_old; averaged over each answer's
    tokens, then over answers (DeepSeekMath's eq. 3)."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    kl = k3_kl(logprobs, ref_logprobs)
    per_token = -surrogate + beta * kl
    lengths = mask.sum(1).clamp_min(1)
    loss = ((per_token * mask).sum(1) / lengths).mean()
    clipped = ((ratio - 1).abs() > clip).float()
    stats = {
        "k3": ((kl * mask).sum(1) / lengths).mean().detach(),
        "clip": ((clipped * mask).sum() / mask.sum().clamp_min(1)).detach(),
    }
    return loss, stats
