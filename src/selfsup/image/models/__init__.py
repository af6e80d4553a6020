"""Backbones, the normalising Encoder and projection heads."""

from selfsup.image.models.backbones import BACKBONES, build_backbone
from selfsup.image.models.encoder import Encoder
from selfsup.image.models.heads import ProjectionHead

__all__ = ["BACKBONES", "Encoder", "ProjectionHead", "build_backbone"]
