"""CLIP (Radford et al., 2021): match images to their captions in a shared embedding space.

An image encoder and a small text transformer (its tokenizer trained on the run's captions and
saved in RUN/tokenizer/) are each followed by a linear projection; the loss is the symmetric
InfoNCE over the batch with a learnable temperature (`selfsup.image.losses.clip`). Every step draws
one of each image's captions from the step's generator. After every epoch the text side, the
projections and the logit scale are exported to RUN/clip.safetensors (the image encoder to
RUN/encoder.safetensors, as for every method); `load_clip(run)` rebuilds the pair for zero-shot
classification and retrieval.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from safetensors.torch import load_file
from torch import Tensor, nn

from selfsup.core import run as rundir
from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.core.tokenizer import KINDS
from selfsup.image import draw
from selfsup.image.config import PretrainConfig
from selfsup.image.data import ImageData, adapt_images
from selfsup.image.data.captions import CaptionData
from selfsup.image.losses.clip import LogitScale, clip_loss
from selfsup.image.methods.base import Method, source_options
from selfsup.image.models import Encoder
from selfsup.image.models.text import POOLINGS, TextTransformer
from selfsup.image.runs import export_encoder, load_encoder


@dataclass
class Options:
    """CLIP's own options: caption data, the text transformer and its tokenizer."""

    templates: str | None = option(
        None, "caption templates for labeled data, '|'-separated or a file (each with {})"
    )
    skip_bad: bool = option(
        False, "skip (and count) caption rows with a missing image or an empty caption"
    )
    caption_holdout: float = option(
        0.2, "the last fraction of caption-file images held out for retrieval", check="[0,1)"
    )
    text_tokenizer: str = option("bpe", "caption tokenizer, bpe | char")
    text_vocab: int = option(1024, "BPE vocabulary size (at least 259)", check=">=1")
    text_width: int = option(256, "width of the text transformer", check=">=1")
    text_layers: int = option(4, "layers of the text transformer", check=">=1")
    text_heads: int = option(4, "attention heads of the text transformer", check=">=1")
    text_context: int = option(32, "longest caption in tokens (longer ones are cut)", check=">=2")
    text_pooling: str = option("eot", "text vector: eot (causal, last token) | mean")
    projection_dim: int = option(128, "size of the shared image–text embedding", check=">=1")


PAD, EOT, UNK = "[PAD]", "<|endoftext|>", "[UNK]"
TOKENIZER_DIR = "tokenizer"
WEIGHTS = "clip.safetensors"


def normalize_caption(text: str) -> str:
    """Lower case, single spaces (as CLIP's tokenizer cleans text)."""
    return " ".join(text.lower().split())


def tokenize(tokenizer: Any, texts: list[str], context: int) -> Tensor:
    """N×context token ids: each text's tokens (cut to context-1), its end-of-text, padding."""
    pad, eot = tokenizer.pad_token_id, tokenizer.eos_token_id
    encoded = tokenizer.backend_tokenizer.encode_batch(
        [normalize_caption(t) for t in texts], add_special_tokens=False
    )
    ids = torch.full((len(texts), context), pad, dtype=torch.long)
    for i, e in enumerate(encoded):
        row = e.ids[: context - 1] + [eot]
        ids[i, : len(row)] = torch.tensor(row)
    return ids


def train_caption_tokenizer(captions: list[list[str]], kind: str, vocab_size: int) -> Any:
    """A tokenizer learned from the training captions (lower-cased)."""
    from selfsup.core.tokenizer import train_tokenizer

    texts = [normalize_caption(c) for group in captions for c in group]
    return train_tokenizer(texts, kind=kind, vocab_size=vocab_size, special_tokens=[PAD, EOT, UNK])


def _check_text_options(options: Options) -> None:
    for flag, value, valid in [
        ("--text-tokenizer", options.text_tokenizer, KINDS),
        ("--text-pooling", options.text_pooling, POOLINGS),
    ]:
        if value not in valid:
            raise SelfsupError(f"{flag} {value!r} is unknown; expected one of {', '.join(valid)}")
    for flag, value, least in [
        ("--text-vocab", options.text_vocab, 256 + 3),  # BPE: all bytes + PAD, EOT, UNK
        ("--text-context", options.text_context, 2),
        ("--text-layers", options.text_layers, 1),
        ("--text-heads", options.text_heads, 1),
    ]:
        if value < least:
            raise SelfsupError(f"{flag} must be at least {least}, got {value}")
    if options.text_width % options.text_heads:
        raise SelfsupError(
            f"--text-width {options.text_width} must be a multiple of "
            f"--text-heads {options.text_heads}"
        )


class Towers(nn.Module):
    """What CLIP learns besides the image encoder: text transformer, projections, logit scale."""

    def __init__(self, text_config: dict[str, Any], feature_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.text = TextTransformer(**text_config)
        self.image_projection = nn.Linear(feature_dim, embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text.width, embed_dim, bias=False)
        self.logit_scale = LogitScale()


class CLIP(Method):
    Options = Options
    # Crops and flips only: colour jitter and grayscale would contradict captions ("a red car").
    default_recipe = "light"

    @classmethod
    def load_data(
        cls, config: PretrainConfig, options: Options
    ) -> tuple[ImageData, ImageData | None, dict[str, Any]]:
        """Images with captions (caption files hold out their last --caption-holdout for
        retrieval); the captions go to the method."""
        from selfsup.image.data.captions import load_captions

        train, held_out = load_captions(
            config.data,
            templates=options.templates,
            skip_bad=options.skip_bad,
            holdout=options.caption_holdout,
            **source_options(config),
        )
        test = held_out.images if held_out is not None else None
        return train.images, test, {"captions": train}

    def __init__(
        self,
        config: PretrainConfig,
        data_info: dict[str, Any],
        options: Options | None = None,
        captions: CaptionData | None = None,
    ) -> None:
        options = options if options is not None else Options()
        _check_text_options(options)
        super().__init__(config, data_info, options)
        saved = Path(config.out or "") / TOKENIZER_DIR
        if config.out and (saved / "tokenizer.json").is_file():  # resuming: the run's tokenizer
            from selfsup.core.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(saved)
        elif captions is not None:
            self.tokenizer = train_caption_tokenizer(
                captions.captions, options.text_tokenizer, options.text_vocab
            )
        else:
            raise SelfsupError("clip needs image–caption data (see `selfsup pretrain clip --help`)")
        text_config = dict(
            vocab_size=len(self.tokenizer),
            width=options.text_width,
            layers=options.text_layers,
            heads=options.text_heads,
            context=options.text_context,
            pad_id=self.tokenizer.pad_token_id,
            pooling=options.text_pooling,
        )
        self.towers = Towers(text_config, self.encoder.feature_dim, options.projection_dim)
        self.data_info = {**data_info, "text": text_config}
        if captions is not None:
            self.data_info["captions"] = {
                "groups": len(captions.captions),
                "captions": sum(len(c) for c in captions.captions),
                "templated": captions.templated,
                "skipped": len(captions.skipped),
            }
            table, counts = self._caption_table(captions.captions)
        else:
            table, counts = torch.zeros(0, 1, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        # the data, rebuilt from the captions on resume: not in checkpoints
        self.register_buffer("caption_ids", table, persistent=False)
        self.register_buffer("caption_counts", counts, persistent=False)

    def _caption_table(self, captions: list[list[str]]) -> tuple[Tensor, Tensor]:
        """(G×K×context token ids, G caption counts): group g's k-th caption, K the most."""
        context, pad = self.options.text_context, self.tokenizer.pad_token_id
        counts = torch.tensor([len(c) for c in captions])
        flat = tokenize(self.tokenizer, [c for group in captions for c in group], context)
        table = torch.full((len(captions), int(counts.max()), context), pad, dtype=torch.long)
        starts = torch.cumsum(counts, 0) - counts
        for g, (start, n) in enumerate(zip(starts.tolist(), counts.tolist(), strict=True)):
            table[g, :n] = flat[start : start + n]
        return table, counts

    # The other pairs of the batch are negatives: `--accumulate` caches gradients (exact).
    grad_cache = True

    def cache_inputs(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, ...]:
        """(views, caption ids): y is each image's caption group, one of whose captions is
        drawn for this step."""
        pick = (torch.rand(len(y), generator=g, device=y.device) * self.caption_counts[y]).long()
        ids = _trim(self.caption_ids[y, pick], self.tokenizer.pad_token_id)
        return self.views(x, g), ids

    def embed(self, views: Tensor, ids: Tensor) -> tuple[Tensor, ...]:
        """(encoder features, image embeddings, text embeddings)."""
        features = self.encoder(views)
        text = self.towers.text_projection(self.towers.text(ids))
        return features, self.towers.image_projection(features), text

    def batch_loss(self, y: Tensor, image: Tensor, text: Tensor) -> Tensor:
        scale = self.towers.logit_scale()
        self.log("train/logit_scale", scale.detach())
        return clip_loss(image, text, scale)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.towers.logit_scale.clamp_()  # after the optimizer step: the stored value too

    def on_fit_start(self) -> None:
        if not self.config.out:  # a module trained outside a run folder writes nothing
            return
        path = Path(self.config.out) / TOKENIZER_DIR
        if self.trainer.is_global_zero and not (path / "tokenizer.json").is_file():
            self.tokenizer.save_pretrained(str(path))

    def on_train_epoch_end(self) -> None:
        if self.trainer.is_global_zero and self.config.out:
            export_encoder(self.towers, Path(self.config.out) / WEIGHTS)

    def save_samples(self, x: Tensor, path: Path) -> None:
        """Each image with the captions (one per group, from the first 1,000 groups) that the
        model ranks highest for it."""
        groups, pad = self.caption_ids[:1000, 0], self.tokenizer.pad_token_id
        with torch.no_grad():
            image = F.normalize(self.towers.image_projection(self.encoder(x)), dim=-1)
            text = F.normalize(
                self.towers.text_projection(self.towers.text(_trim(groups, pad))), dim=-1
            )
            top = (image @ text.T).topk(min(3, len(groups)), dim=1)
        decode = self.tokenizer.decode
        n = len(x)
        fig = Figure(figsize=(6, 1.1 * n + 0.3), layout="constrained")
        fig.suptitle("captions the model ranks highest for each image", fontsize=9)
        axes = np.asarray(fig.subplots(n, 2, squeeze=False, width_ratios=[1, 4]))
        for i in range(n):
            draw.show(axes[i, 0], x[i].cpu().float() / 255)
            lines = [
                f"{s:.2f}  " + textwrap.shorten(decode(groups[j], skip_special_tokens=True), 70)
                for s, j in zip(top.values[i].tolist(), top.indices[i].tolist(), strict=True)
            ]
            axes[i, 1].axis("off")
            axes[i, 1].text(0, 0.5, "\n".join(lines), fontsize=8, va="center")
        draw.save(fig, path)


def _trim(ids: Tensor, pad: int) -> Tensor:
    """Drop the padding columns every row has (shorter sequences cost less attention)."""
    return ids[:, : int((ids != pad).sum(dim=1).max())]


class CLIPModel(nn.Module):
    """A trained CLIP for inference: normalised image and text embeddings in the shared space."""

    def __init__(
        self,
        encoder: Encoder,
        towers: Towers,
        tokenizer: Any,
        context: int,
        image_shape: tuple[int, int, int],
    ) -> None:
        super().__init__()
        self.encoder, self.towers, self.tokenizer = encoder, towers, tokenizer
        self.context, self.image_shape = context, image_shape

    @property
    def device(self) -> torch.device:
        return self.towers.logit_scale.log_scale.device

    @torch.no_grad()
    def encode_images(self, x: Tensor, batch_size: int = 256) -> Tensor:
        """uint8 N×C×H×W images (converted to the encoder's channels and size) -> N×D, on CPU."""
        c, h, w = self.image_shape
        out = []
        for start in range(0, len(x), batch_size):
            batch = adapt_images(x[start : start + batch_size], c, (h, w)).to(self.device)
            image = self.towers.image_projection(self.encoder(batch))
            out.append(F.normalize(image.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 512) -> Tensor:
        """Captions -> N×D, on CPU."""
        out = []
        for start in range(0, len(texts), batch_size):
            ids = tokenize(self.tokenizer, texts[start : start + batch_size], self.context)
            text = self.towers.text(_trim(ids, self.tokenizer.pad_token_id).to(self.device))
            out.append(F.normalize(self.towers.text_projection(text).float(), dim=-1).cpu())
        return torch.cat(out)


def load_clip(run: str | Path) -> CLIPModel:
    """The image and text encoders of a `clip` run (eval mode)."""
    from selfsup.core.tokenizer import load_tokenizer

    config = rundir.read_config(run)
    if config.get("method") != "clip" or "text" not in config:
        raise SelfsupError(f"{run} is a {config.get('method')} run; this needs a clip run")
    weights = Path(run) / WEIGHTS
    if not weights.is_file():
        raise SelfsupError(f"{weights} is missing: the run has not finished an epoch yet")
    encoder = load_encoder(run)
    towers = Towers(config["text"], encoder.feature_dim, config["projection_dim"])  # type: ignore[arg-type]
    try:
        towers.load_state_dict(load_file(weights))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise SelfsupError(f"{weights} is not a readable clip weights file ({e})") from None
    tokenizer = load_tokenizer(Path(run) / TOKENIZER_DIR)
    shape = rundir.input_shape(config)
    return CLIPModel(encoder, towers, tokenizer, config["text"]["context"], shape).eval()  # type: ignore[arg-type]
