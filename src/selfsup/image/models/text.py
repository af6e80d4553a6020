"""A small text transformer encoder: token ids -> one vector per text (CLIP's text tower)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

POOLINGS = ("eot", "mean")


class TextTransformer(nn.Module):
    """Token + position embeddings, pre-norm transformer layers, final LayerNorm, pooling.

    Input: B×L token ids, right-padded with `pad_id`; each text ends with its end-of-text token
    (the last non-pad position). `pooling="eot"` (CLIP) takes that position's output under a
    causal mask, so it has read the whole text and nothing after it; `"mean"` averages the
    non-pad positions under a bidirectional padding mask. Output: B×width.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        context: int = 32,
        pad_id: int = 0,
        pooling: str = "eot",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.context, self.pad_id, self.pooling, self.width = context, pad_id, pooling, width
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.randn(context, width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # enable_nested_tensor only helps post-norm layers at inference, and warns otherwise
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.tokens.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        b, length = ids.shape
        if length > self.context:
            raise ValueError(f"texts of {length} tokens exceed the context of {self.context}")
        pad = ids == self.pad_id
        if pad[:, 0].any():
            raise ValueError("every text needs at least one token before the padding")
        h = self.tokens(ids) + self.positions[:length]
        if self.pooling == "eot":
            causal = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
            h = self.norm(self.transformer(h, mask=causal.to(h.dtype), is_causal=True))
            last = (~pad).sum(dim=1) - 1  # the end-of-text token: the last before the padding
            return h[torch.arange(b, device=ids.device), last]
        h = self.norm(self.transformer(h, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return (h * keep).sum(dim=1) / keep.sum(dim=1)
