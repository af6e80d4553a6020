"""Contrastive losses: InfoNCE / NT-Xent / SupCon (one function) and the margin loss."""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.engine.distributed import (
    gather_no_grad,
    gather_with_grad,
    is_distributed,
    rank,
    unique_ids,
    world_size,
)
from selfsup.image.losses.chunked import weighted_lse


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def info_nce(
    z: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 0.5,
    normalize: bool = True,
    gather: bool | None = None,
    reference: bool = False,
) -> torch.Tensor:
    """InfoNCE over N×D embeddings where samples sharing an id are positives (SupCon L_out form).

    Anchor i: -mean_{p in P(i)} [s_ip/τ - logsumexp_{j≠i} s_ij/τ], s = cosine similarity when
    `normalize`. Averaged over anchors with at least one positive (0, still attached to z, if none).
    ids = arange(B).repeat(2) gives SimCLR's NT-Xent; ids = labels gives SupCon.

    `gather` (default: on in a process group of more than one process) contrasts this process's
    anchors with the samples and ids of all processes, which must pass the same N and call this
    together; the mean of the processes' losses, and the gradient DDP averages, are those of the
    loss on all processes' samples at once. Ids must then be unique across processes where they
    should be (`selfsup.engine.distributed.unique_ids`).

    The logsumexp runs in row blocks (`selfsup.image.losses.chunked.weighted_lse`): memory linear in
    N, gradient formed in the forward pass. `reference` (`info_nce_reference`) keeps the whole n×N
    logit matrix in memory and uses autograd's backward: the plain version the fast path is tested
    against.
    """
    setup = _Setup(z, ids, temperature, gather)
    if setup.num_anchors == 0:
        return z.sum() * 0
    with torch.autocast(z.device.type, enabled=False):  # low-precision logits/τ lose too much
        z_all = setup.embeddings(z, normalize)
        loss = setup.plain_loss if reference else setup.blocked_loss
        return loss(z_all, temperature)


info_nce_reference = partial(info_nce, reference=True)


class _Setup:
    """What both InfoNCE versions share: checks, the gathered ids and positive counts."""

    # Gradient scale with W processes of n samples each, N = W·n: the loss on the concatenated
    # batch is L = (1/A) Σ_i ℓ_i over the A anchors (of all processes) that have a positive.
    # Process r returns L_r = (W/A) Σ_{i local to r} ℓ_i, so mean_r L_r = L. gather_with_grad
    # gives process r the gradient Σ_s ∂L_s/∂z_r for its own samples z_r, and DDP averages
    # parameter gradients over r: (1/W) Σ_r Σ_s ∂L_s/∂z_r · ∂z_r/∂θ = ∂(mean_s L_s)/∂θ = ∂L/∂θ.
    def __init__(
        self, z: torch.Tensor, ids: torch.Tensor, temperature: float, gather: bool | None
    ) -> None:
        _check_temperature(temperature)
        if z.dim() != 2 or ids.shape != z.shape[:1]:
            raise ValueError(
                f"expected z N×D and ids (N,), got {tuple(z.shape)} and {tuple(ids.shape)}"
            )
        self.gather = is_distributed() if gather is None else gather
        self.world, self.start = (world_size(), rank() * len(z)) if self.gather else (1, 0)
        self.local = slice(self.start, self.start + len(z))
        all_ids = gather_no_grad(ids) if self.gather else ids
        _, self.group, self.counts = torch.unique(all_ids, return_inverse=True, return_counts=True)
        self.num_pos = self.counts[self.group] - 1
        self.has_pos = self.num_pos > 0
        self.num_anchors = int(self.has_pos.sum())  # the same on every process: all see all ids

    def embeddings(self, z: torch.Tensor, normalize: bool) -> torch.Tensor:
        """All processes' (normalised, at least float32) embeddings, differentiable."""
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        if normalize:
            z = F.normalize(z, dim=1)
        return gather_with_grad(z) if self.gather else z

    def blocked_loss(self, z_all: torch.Tensor, temperature: float) -> torch.Tensor:
        """The loss of this process's anchors, the logsumexp in row blocks."""
        rows = self.start + self.has_pos[self.local].nonzero().squeeze(1)  # anchors, in z_all
        weight = z_all.new_full((len(rows),), self.world / self.num_anchors)
        zt = z_all[rows] / temperature
        lse = weighted_lse(zt, z_all, weight, rows)
        return lse - (self.positive_logits(zt, z_all, rows) * weight).sum()

    def plain_loss(self, z_all: torch.Tensor, temperature: float) -> torch.Tensor:
        """The same loss from the whole n×N logit matrix."""
        rows = torch.arange(self.local.start, self.local.stop, device=z_all.device)
        zt = z_all[rows] / temperature
        logits = zt @ z_all.T  # n×N
        logits.diagonal(offset=self.start).fill_(float("-inf"))  # not its own negative
        loss = torch.logsumexp(logits, dim=1) - self.positive_logits(zt, z_all, rows)
        return loss[self.has_pos[self.local]].sum() * self.world / self.num_anchors

    def positive_logits(
        self, zt: torch.Tensor, z_all: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """mean_{p in P(i)} s_ip/τ for the anchors `rows` of z_all (0 where none)."""
        # sum over P(i) = zt_i · (sum of z over i's id group - z_i): O(N·D), no N×N mask
        group_sum = z_all.new_zeros(len(self.counts), z_all.shape[1])
        group_sum.index_add_(0, self.group, z_all)
        pos = (zt * (group_sum[self.group[rows]] - z_all[rows])).sum(dim=1)
        return pos / self.num_pos[rows].clamp(min=1)


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool | None = None
) -> torch.Tensor:
    """SimCLR's NT-Xent for two views B×D: each sample's positive is its other view.

    Sample ids are offset by rank, so under `gather` each sample's only positive stays its own
    other view and every other process's samples are negatives.
    """
    ids = unique_ids(z1.shape[0], z1.device).repeat(2)
    return info_nce(torch.cat([z1, z2]), ids, temperature, gather=gather)


def supcon_ids(labels: torch.Tensor) -> torch.Tensor:
    """SupCon's ids: the label where labels >= 0, else the sample's own id -1 - index.

    Labels and sample ids cannot collide; sample indices are offset by rank, so they stay
    unique when `info_nce` gathers samples across processes.
    """
    return torch.where(labels >= 0, labels, -1 - unique_ids(len(labels), labels.device))


MARGIN_FORMS = ("hadsell", "squared-distance")


def contrastive_margin(
    f_x: torch.Tensor,
    f_pos: torch.Tensor,
    f_neg: torch.Tensor,
    margin: float = 1.0,
    form: str = "hadsell",
) -> torch.Tensor:
    """Batch mean of d(x, pos)² + hinge(x, neg), d the Euclidean distance.

    form "hadsell" (Hadsell, Chopra & LeCun 2006): hinge = max(0, margin - d)², so `margin` is a
    distance: negatives farther than it cost nothing. The mean is twice the paper's loss on one
    similar and one dissimilar pair (the paper halves both terms). form "squared-distance", the
    earlier default kept for compatibility: hinge = max(0, margin - d²), `margin` a squared
    distance.
    """
    if form not in MARGIN_FORMS:
        raise ValueError(f"form must be one of {', '.join(MARGIN_FORMS)}, got {form!r}")
    d_pos_sq = (f_x - f_pos).pow(2).sum(dim=1)
    if form == "hadsell":
        # vector_norm's gradient at d = 0 is 0, not NaN (f_x == f_neg)
        d_neg = torch.linalg.vector_norm(f_x - f_neg, dim=1)
        hinge = (margin - d_neg).clamp(min=0).pow(2)
    else:
        hinge = (margin - (f_x - f_neg).pow(2).sum(dim=1)).clamp(min=0)
    return (d_pos_sq + hinge).mean()


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

    def __init__(self, margin: float = 1.0, form: str = "hadsell") -> None:
        super().__init__()
        if form not in MARGIN_FORMS:
            raise ValueError(f"form must be one of {', '.join(MARGIN_FORMS)}, got {form!r}")
        self.margin, self.form = margin, form

    def forward(self, f_x: torch.Tensor, f_pos: torch.Tensor, f_neg: torch.Tensor) -> torch.Tensor:
        return contrastive_margin(f_x, f_pos, f_neg, self.margin, self.form)
