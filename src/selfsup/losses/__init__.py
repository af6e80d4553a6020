"""Self-supervised losses."""

from selfsup.losses.contrastive import (
    ContrastiveMarginLoss,
    InfoNCELoss,
    NTXentLoss,
    contrastive_margin,
    info_nce,
    nt_xent,
)

__all__ = [
    "ContrastiveMarginLoss",
    "InfoNCELoss",
    "NTXentLoss",
    "contrastive_margin",
    "info_nce",
    "nt_xent",
]
