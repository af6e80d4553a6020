"""Contrastive losses: InfoNCE / NT-Xent / SupCon (one function) and the margin loss."""

import torch
import torch.nn.functional as F
from torch import nn


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def info_nce(
    z: torch.Tensor, ids: torch.Tensor, temperature: float = 0.5, normalize: bool = True
) -> torch.Tensor:
    """InfoNCE over N×D embeddings where samples sharing an id are positives (SupCon L_out form).

    Anchor i: -mean_{p in P(i)} [s_ip/τ - logsumexp_{j≠i} s_ij/τ], s = cosine similarity when
    `normalize`. Averaged over anchors with at least one positive (0, still attached to z, if none).
    ids = arange(B).repeat(2) gives SimCLR's NT-Xent; ids = labels gives SupCon.
    """
    _check_temperature(temperature)
    if z.dim() != 2 or ids.shape != z.shape[:1]:
        raise ValueError(
            f"expected z N×D and ids (N,), got {tuple(z.shape)} and {tuple(ids.shape)}"
        )
    _, group, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    num_pos = counts[group] - 1
    has_pos = num_pos > 0
    if not has_pos.any():
        return z.sum() * 0
    with torch.autocast(z.device.type, enabled=False):  # low-precision logits/τ lose too much
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        if normalize:
            z = F.normalize(z, dim=1)
        zt = z / temperature
        logits = zt @ z.T  # the only N×N tensor of the forward pass
        logits.fill_diagonal_(float("-inf"))
        lse = torch.logsumexp(logits, dim=1)
        # sum_{p in P(i)} s_ip/τ = zt_i · (sum of z over i's id group - z_i): O(N·D), no N×N mask
        group_sum = z.new_zeros(len(counts), z.shape[1]).index_add_(0, group, z)
        pos = (zt * (group_sum[group] - z)).sum(dim=1)
        loss = lse - pos / num_pos.clamp(min=1)
        return loss[has_pos].mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent for two views B×D: each sample's positive is its other view."""
    ids = torch.arange(z1.shape[0], device=z1.device).repeat(2)
    return info_nce(torch.cat([z1, z2]), ids, temperature)


def contrastive_margin(
    f_x: torch.Tensor, f_pos: torch.Tensor, f_neg: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """Batch mean of ||f_x - f_pos||² + max(0, margin - ||f_x - f_neg||²) (squared distances)."""
    d_pos = (f_x - f_pos).pow(2).sum(dim=1)
    d_neg = (f_x - f_neg).pow(2).sum(dim=1)
    return (d_pos + (margin - d_neg).clamp(min=0)).mean()


class InfoNCELoss(nn.Module):
    """Module wrapper of `info_nce`: forward(z, ids)."""

    def __init__(self, temperature: float = 0.5, normalize: bool = True) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature, self.normalize = temperature, normalize

    def forward(self, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return info_nce(z, ids, self.temperature, self.normalize)


class NTXentLoss(nn.Module):
    """Module wrapper of `nt_xent`: forward(z1, z2)."""

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(z1, z2, self.temperature)


class ContrastiveMarginLoss(nn.Module):
    """Module wrapper of `contrastive_margin`: forward(f_x, f_pos, f_neg)."""

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, f_x: torch.Tensor, f_pos: torch.Tensor, f_neg: torch.Tensor) -> torch.Tensor:
        return contrastive_margin(f_x, f_pos, f_neg, self.margin)
