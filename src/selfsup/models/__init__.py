"""Backbones, the normalising Encoder and projection heads."""

from selfsup.models.backbones import BACKBONES, build_backbone
from selfsup.models.encoder import Encoder
from selfsup.models.heads import ProjectionHead

__all__ = ["BACKBONES", "Encoder", "ProjectionHead", "build_backbone"]
