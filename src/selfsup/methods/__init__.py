"""Self-supervised methods: one small file each, registered by name.

The registry maps names to import paths so that listing methods (e.g. for `--help`) does not
import torch and Lightning.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selfsup.methods.base import Method

METHODS: dict[str, str] = {
    "simclr": "selfsup.methods.simclr:SimCLR",
    "autoencoder": "selfsup.methods.autoencoder:Autoencoder",
    "rotation": "selfsup.methods.rotation:Rotation",
    "supcon": "selfsup.methods.supcon:SupCon",
    "clip": "selfsup.methods.clip:CLIP",
    "inpainting": "selfsup.methods.inpainting:Inpainting",
    "mae": "selfsup.methods.mae:MAE",
    "jigsaw": "selfsup.methods.jigsaw:Jigsaw",
    "colorization": "selfsup.methods.colorization:Colorization",
    "moco": "selfsup.methods.moco:MoCo",
    "moco-v3": "selfsup.methods.moco_v3:MoCoV3",
    "simsiam": "selfsup.methods.simsiam:SimSiam",
    "dino": "selfsup.methods.dino:DINO",
    "byol": "selfsup.methods.byol:BYOL",
    "vicreg": "selfsup.methods.vicreg:VICReg",
    "barlow-twins": "selfsup.methods.barlow_twins:BarlowTwins",
}


def get_method(name: str) -> type[Method]:
    module, cls = METHODS[name].split(":")
    return getattr(import_module(module), cls)
