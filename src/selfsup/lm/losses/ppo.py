"""PPO for language models (InstructGPT's RLHF stage) as pure functions of per-token tensors.

All tensors are B×T over the *response* tokens of B rollouts, right-padded; ``mask`` is 1 on the
real response tokens (the end token included) and 0 on padding. The episode ends after the last
real token, so nothing is bootstrapped beyond it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the entries where mask is 1."""
    return (x * mask).sum() / mask.sum().clamp_min(1)


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    total: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """x standardised with the mean and (unbiased) variance of its masked entries; padding -> 0.
    `total` sums a statistic over the parts of a batch (e.g. `sum_over_processes`: its mean and
    variance are then every process's entries', as one process's of the whole batch)."""
    total = total or (lambda t: t)
    count = total(mask.sum())
    mean = total((x * mask).sum()) / count.clamp_min(1)
    var = total(((x - mean) ** 2 * mask).sum()) / (count - 1).clamp_min(1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def shaped_rewards(
    score: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """(per-token rewards, per-token KL estimate) for the policy's sampled responses.

    Every token pays -β·(log π - log π_ref), the sampled-token estimate of the KL from the frozen
    reference; the reward model's score of the whole response (B values) arrives on its last
    real token.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = (mask.cumsum(1) * mask).argmax(1)  # index of each row's last real token
    rewards[torch.arange(len(score), device=score.device), last] += score.to(rewards.dtype)
    return rewards * mask, kl


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """(advantages, returns) by generalised advantage estimation, backwards over the tokens.

    δ_t = r_t + γ·V_{t+1} - V_t (V past the last real token is 0), A_t = δ_t + γλ·A_{t+1},
    returns = A + V (the value head's regression target).
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, Tensor, Tensor]:
    """(clipped surrogate loss, clip fraction, approximate KL(old || new)) over real tokens."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clip_fraction.detach(), approx_kl.detach()


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> Tensor:
    """Clipped value loss: ½·max((V - R)², (V_clipped - R)²), V_clipped within ±clip of V_old."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def _at_least_float32(x: Tensor) -> Tensor:
    """Half-precision logits in float32 for the softmax; float32 and float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(token) under logits: logits B×T×V for the positions that predict tokens B×T."""
    logp = F.log_softmax(_at_least_float32(logits), -1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean entropy of the next-token distributions over real tokens."""
    logp = F.log_softmax(_at_least_float32(logits), -1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)
