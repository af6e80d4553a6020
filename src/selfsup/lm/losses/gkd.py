"""The generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024, eq. 1), per token.

With P the teacher's next-token distribution, Q the student's (both softmax(logits / T)) and
M = β·P + (1 - β)·Q, JSD(β) = β·KL(P || M) + (1 - β)·KL(Q || M). Its limits are taken as TRL's
GKDTrainer takes them: β = 0 is the forward KL(P || Q) (the student covers the teacher's mass,
supervised distillation's choice), β = 1 the reverse KL(Q || P) (the student seeks the
teacher's modes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfsup.core.errors import SelfsupError


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dimension, from log-probabilities (0·log 0 = 0)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """The mean over the tokens where `mask` (B×T, bool) is true (every one without it) of the
    generalized JSD between the teacher's and the student's distributions at `temperature`
    (logits B×T×V, computed in float32 at least); TRL's `GKDTrainer.generalized_jsd_loss` with
    labels -100 off the mask. Gradients reach the student only."""
    if not 0 <= beta <= 1:
        raise SelfsupError(f"--beta must be between 0 and 1, got {beta}")
    if temperature <= 0:
        raise SelfsupError(f"--temperature must be positive, got {temperature}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, -1)
    if beta == 0:
        per_token = _kl(log_p, log_q)
    elif beta == 1:
        per_token = _kl(log_q, log_p)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        per_token = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if mask is None:
        return per_token.mean()
    if not mask.any():
        raise SelfsupError("no answer token in the batch to distill")
    return per_token[mask.bool()].mean()
