"""Self-supervised losses."""

from selfsup.image.losses.contrastive import (
    MARGIN_FORMS,
    ContrastiveMarginLoss,
    InfoNCELoss,
    NTXentLoss,
    contrastive_margin,
    info_nce,
    nt_xent,
)

__all__ = [
    "MARGIN_FORMS",
    "ContrastiveMarginLoss",
    "InfoNCELoss",
    "NTXentLoss",
    "contrastive_margin",
    "info_nce",
    "nt_xent",
]
