"""Self-supervised methods: one small file each, registered by name.

The registry maps names to import paths so that listing methods (e.g. for `--help`) does not
import torch and Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from selfsup.core.registry import Registry

if TYPE_CHECKING:
    from selfsup.image.methods.base import Method

METHODS = Registry(
    {
        "simclr": "selfsup.image.methods.simclr:SimCLR",
        "autoencoder": "selfsup.image.methods.autoencoder:Autoencoder",
        "rotation": "selfsup.image.methods.rotation:Rotation",
        "supcon": "selfsup.image.methods.supcon:SupCon",
        "clip": "selfsup.image.methods.clip:CLIP",
        "inpainting": "selfsup.image.methods.inpainting:Inpainting",
        "mae": "selfsup.image.methods.mae:MAE",
        "jigsaw": "selfsup.image.methods.jigsaw:Jigsaw",
        "colorization": "selfsup.image.methods.colorization:Colorization",
        "moco": "selfsup.image.methods.moco:MoCo",
        "moco-v3": "selfsup.image.methods.moco_v3:MoCoV3",
        "simsiam": "selfsup.image.methods.simsiam:SimSiam",
        "dino": "selfsup.image.methods.dino:DINO",
        "byol": "selfsup.image.methods.byol:BYOL",
        "vicreg": "selfsup.image.methods.vicreg:VICReg",
        "barlow-twins": "selfsup.image.methods.barlow_twins:BarlowTwins",
        "nnclr": "selfsup.image.methods.nnclr:NNCLR",
        "distill": "selfsup.image.methods.distill:Distill",
    }
)


def get_method(name: str) -> type[Method]:
    return METHODS.load(name)
