"""Losses of the momentum and non-contrastive methods. Two views of an image are pulled
together; collapse to a constant is prevented by negatives from a queue of earlier keys (MoCo),
by an asymmetric predictor and a stop-gradient (SimSiam, BYOL), by a variance and decorrelation
penalty (VICReg), or by a cross-correlation pushed to the identity (Barlow Twins).

Pure functions of B×D embeddings, written after the papers and their authors' code; each is
tested against a float64 formula and, where installed, lightly's implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.engine.distributed import gather_no_grad, rank


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """-mean cos(p, stopgrad(z)): SimSiam's D(p, z) (Chen & He, 2021). BYOL's loss
    2 - 2 cos is the same up to an affine map."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def vicreg(
    z_a: Tensor,
    z_b: Tensor,
    invariance: float = 25.0,
    variance: float = 25.0,
    covariance: float = 1.0,
    eps: float = 1e-4,
) -> Tensor:
    """VICReg (Bardes, Ponce & LeCun, 2022) as in the authors' code: `invariance` × MSE of the
    two embeddings + `variance` × the mean hinge max(0, 1 - std) of each dimension (averaged over
    the two branches) + `covariance` × the squared off-diagonal covariances / D (summed over the
    two branches)."""
    if len(z_a) < 2:
        raise ValueError("vicreg needs at least 2 samples (it measures their spread)")
    z_a, z_b = _at_least_float32(z_a), _at_least_float32(z_b)
    inv = F.mse_loss(z_a, z_b)
    var = (_std_hinge(z_a, eps) + _std_hinge(z_b, eps)) / 2
    cov = _off_diagonal_covariance(z_a) + _off_diagonal_covariance(z_b)
    return invariance * inv + variance * var + covariance * cov


def _at_least_float32(z: Tensor) -> Tensor:
    """Half precision is too coarse for variances and correlations; float64 stays float64."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _std_hinge(z: Tensor, eps: float) -> Tensor:
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(1 - std).mean()


def _off_diagonal_covariance(z: Tensor) -> Tensor:
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = z.T @ z / (n - 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return off.pow(2).sum() / d


def barlow_twins(z_a: Tensor, z_b: Tensor, redundancy: float = 5e-3) -> Tensor:
    """Barlow Twins (Zbontar et al., 2021): standardise each dimension over the batch (BatchNorm
    without affine, biased std), C = z_a^T z_b / N, loss = Σ_i (1 - C_ii)² + `redundancy` ×
    Σ_{i≠j} C_ij²."""
    if len(z_a) < 2:
        raise ValueError("barlow_twins needs at least 2 samples (it standardises over them)")
    z_a, z_b = _standardise(_at_least_float32(z_a)), _standardise(_at_least_float32(z_b))
    c = z_a.T @ z_b / len(z_a)
    on = (1 - torch.diagonal(c)).pow(2).sum()
    off = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on + redundancy * off


def _standardise(z: Tensor, eps: float = 1e-5) -> Tensor:
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


def queue_info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo's InfoNCE (He et al., 2020): each query's positive is its own key (the other view
    through the momentum encoder, no gradient), its negatives the queue of earlier keys.
    q, k: B×D; queue: K×D; all L2-normalised here. -mean log softmax([q·k, q·queue] / T)[0]."""
    q, k, queue = (F.normalize(_at_least_float32(t), dim=-1) for t in (q, k.detach(), queue))
    positive = (q * k).sum(dim=-1, keepdim=True)
    logits = torch.cat([positive, q @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def dino(
    teacher: list[Tensor],
    student: list[Tensor],
    center: Tensor,
    teacher_temperature: float = 0.04,
    student_temperature: float = 0.1,
) -> Tensor:
    """DINO's self-distillation (Caron et al., 2021): the student's log-softmax at
    `student_temperature` against the teacher's centred, sharpened softmax, over every pair of
    a teacher view i and a *different* student view j (the teacher sees the global views, which
    are the student's first views). Mean over pairs and samples; no gradient to the teacher."""
    targets = [
        F.softmax((t.detach().float() - center) / teacher_temperature, dim=-1) for t in teacher
    ]
    logs = [F.log_softmax(s.float() / student_temperature, dim=-1) for s in student]
    pairs = [(i, j) for i in range(len(targets)) for j in range(len(logs)) if i != j]
    if not pairs:
        raise ValueError("dino needs at least two views")
    return sum(-(targets[i] * logs[j]).sum(-1).mean() for i, j in pairs) / len(pairs)


def batch_info_nce(q: Tensor, k: Tensor, temperature: float = 1.0) -> Tensor:
    """MoCo v3's contrastive loss (Chen, Xie & He, 2021): each query's positive is the key of
    its own image, its negatives the keys of the other images of the (global) batch; scaled by
    2T as in the authors' code. q, k: B×D, L2-normalised here; no gradient to the keys."""
    q = F.normalize(_at_least_float32(q), dim=-1)
    k = F.normalize(_at_least_float32(gather_no_grad(k.detach())), dim=-1)
    labels = torch.arange(len(q), device=q.device) + rank() * len(q)
    return F.cross_entropy(q @ k.T / temperature, labels) * 2 * temperature
