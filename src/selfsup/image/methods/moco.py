"""MoCo v2 (He et al., 2020; Chen et al., 2020): a query encoder and a momentum (EMA) key
encoder, each with a projection MLP; every query's positive is the key of its other view, its
negatives a queue of `--queue-size` keys from earlier batches (from every process under DDP).
The queue and its position are buffers of the model, so they are in every checkpoint and a
resumed run continues with the same negatives. Symmetrised: each view serves as query once.
The keys join the queue after each optimiser step, so that `--accumulate` K micro-batches see
the queue one batch of K·B would: ordinary accumulation is exact here (no in-batch negatives)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from selfsup.core.config import option
from selfsup.image.losses.noncontrastive import queue_info_nce
from selfsup.image.methods.siamese import MemoryBank, Momentum, Siamese


@dataclass
class Options:
    """MoCo v2's own options (the paper: a 65,536-key queue, T 0.2, momentum 0.999)."""

    projection_dim: int = option(128, "output size of the projection head", check=">=1")
    projection_hidden: int = option(512, "hidden size of the projection head", check=">=1")
    queue_size: int = option(4096, "negatives kept from earlier batches", check=">=1")
    temperature: float = option(0.2, "InfoNCE temperature", check=">0")
    momentum: float = option(
        0.99, "the key encoder's EMA momentum at the start (rises to 1 by the end)", check="[0,1]"
    )


class MoCo(Momentum, MemoryBank, Siamese):
    Options = Options
    momentum_targets = (("key_encoder", "encoder"), ("key_projection", "projection"))

    def build_heads(self) -> None:
        super().build_heads()
        self.pending: list[Tensor] = []  # this step's keys, micro-batch by micro-batch

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        query = self.embed_views(x, g)
        q1, q2 = query.z.chunk(2)
        keys = self.targets(query.views)
        k1, k2 = keys.chunk(2)
        t = self.options.temperature
        loss = (queue_info_nce(q1, k2, self.queue, t) + queue_info_nce(q2, k1, self.queue, t)) / 2
        if self.training:  # enqueued after the optimiser step: micro-batches share one queue
            self.pending.append(keys)
        return loss, query.features[: len(x)]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        keys = [torch.stack(k.chunk(2), dim=1) for k in self.pending]  # image by image
        if keys:
            self.enqueue(torch.cat(keys).transpose(0, 1).flatten(0, 1))  # a whole batch's order
        self.pending.clear()
