"""Cross-modal retrieval: image→text and text→image recall@k and median rank."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.core import run as rundir
from selfsup.core.errors import SelfsupError
from selfsup.image import draw
from selfsup.image.data.captions import CaptionData

KS = (1, 5, 10)


def _ranks(similarity: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """1-based rank of the best-ranked correct column of each row (`correct`: bool, same shape).

    A row's rank is 1 + the number of columns scoring strictly higher than its best correct one
    (ties count in the query's favour).
    """
    best = similarity.masked_fill(~correct, -math.inf).max(dim=1, keepdim=True).values
    return (similarity > best).sum(dim=1) + 1


def retrieval_metrics(
    image_emb: torch.Tensor | np.ndarray,
    text_emb: torch.Tensor | np.ndarray,
    text_image: torch.Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """Recall@k (%) and median rank of N images and M captions; caption j shows `text_image[j]`.

    Image→text: an image is found at rank r when its best-ranked own caption is r-th among all M
    captions; text→image: a caption's image is r-th among the N images. Cosine similarity.
    """
    image = F.normalize(torch.as_tensor(np.asarray(image_emb), dtype=torch.float32), dim=1)
    text = F.normalize(torch.as_tensor(np.asarray(text_emb), dtype=torch.float32), dim=1)
    owner = torch.as_tensor(np.asarray(text_image), dtype=torch.long)
    similarity = image @ text.T  # N×M
    correct = owner[None, :] == torch.arange(len(image))[:, None]
    if not correct.any(dim=1).all():
        raise ValueError("every image needs at least one caption")
    ranks = {"i2t": _ranks(similarity, correct), "t2i": _ranks(similarity.T, correct.T)}
    out: dict[str, float] = {}
    for direction, r in ranks.items():
        for k in ks:
            out[f"{direction}_r@{k}"] = 100 * (r <= k).double().mean().item()
        # the usual convention (VSE++, CLIP benchmarks): the median rounded down
        out[f"{direction}_median_rank"] = float(np.floor(np.median(r.numpy())))
    return out


def chance_metrics(
    text_image: torch.Tensor | np.ndarray | Sequence[int],
    num_images: int,
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """Expected recall@k (%) of random rankings, for comparison with `retrieval_metrics`.

    Text→image: k/N. Image→text with c own captions among M: 1 - C(M-c, k)/C(M, k), averaged
    over images.
    """
    counts = np.bincount(np.asarray(text_image), minlength=num_images)
    m = int(counts.sum())
    out: dict[str, float] = {}
    for k in ks:
        miss = [math.comb(m - c, k) / math.comb(m, k) if k <= m else 0.0 for c in counts]
        out[f"i2t_r@{k}"] = 100 * (1 - float(np.mean(miss)))
    for k in ks:
        out[f"t2i_r@{k}"] = 100 * min(1.0, k / num_images)
    return out


def format_retrieval(metrics: dict[str, float], chance: dict[str, float] | None = None) -> str:
    """A small table: one row per direction, recall@k columns, then median rank."""
    ks = sorted({int(key.split("@")[1]) for key in metrics if "_r@" in key})
    head = f"{'':14}" + "".join(f"{f'R@{k}':>9}" for k in ks) + f"{'median rank':>13}"
    lines = [head]
    for direction, label in (("i2t", "image→text"), ("t2i", "text→image")):
        cells = "".join(f"{metrics[f'{direction}_r@{k}']:9.1f}" for k in ks)
        lines.append(f"{label:14}{cells}{metrics[f'{direction}_median_rank']:13.0f}")
        if chance:
            cells = "".join(f"{chance[f'{direction}_r@{k}']:9.1f}" for k in ks)
            lines.append(f"{'  chance':14}{cells}")
    return "\n".join(lines)


def held_out_pairs(
    run: str | Path, data: str | None = None, split: str = "test", data_dir: str | None = None
) -> CaptionData:
    """The image–caption pairs of a clip run's held-out split (or another source's, `data`)."""
    from selfsup.image.data.captions import load_captions

    config = rundir.read_config(run)
    spec = data or config["data"]
    if split not in ("train", "test"):
        raise SelfsupError(f"--split {split!r} is unknown; expected train or test")
    train, test = load_captions(
        spec,
        templates=config.get("templates"),
        skip_bad=bool(config.get("skip_bad")),
        holdout=float(config.get("caption_holdout", 0.2)),
        data_dir=data_dir or config.get("data_dir"),
        image_size=config.get("image_size"),
    )
    pairs = train if split == "train" else test
    if pairs is None:
        raise SelfsupError(
            f"--data {spec} has no held-out images (--caption-holdout 0); use --split train"
        )
    return pairs


def retrieval_evaluation(
    run: str | Path,
    data: str | None = None,
    *,
    split: str = "test",
    data_dir: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Image→text and text→image recall@1/5/10 and median rank of a clip run, next to chance.

    On the run's held-out images by default (caption files: the last --caption-holdout of the
    images). Writes RUN/eval/DATA/retrieval.json.
    """
    from selfsup.engine.device import resolve_device
    from selfsup.image.methods.clip import load_clip

    pairs = held_out_pairs(run, data, split, data_dir)
    if pairs.templated:
        raise SelfsupError(
            f"--data {pairs.images.name}: captions from class templates are shared by many images; "
            "retrieval needs image–caption pairs (use `selfsup zero-shot` for labeled data)"
        )
    model = load_clip(run).to(resolve_device(device))
    texts, owners = pairs.caption_pairs()
    metrics = retrieval_metrics(
        model.encode_images(pairs.images.x), model.encode_texts(texts), owners
    )
    results = {
        "run": str(run),
        "data": pairs.images.name,
        "split": split,
        "images": len(pairs.images),
        "captions": len(texts),
        "metrics": metrics,
        "chance": chance_metrics(owners, len(pairs.images)),
    }
    out = rundir.inside_run(run, "eval", rundir.slug(pairs.images.name))
    out.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write_text(out / "retrieval.json", json.dumps(results, indent=2) + "\n")
    results["out"] = str(out / "retrieval.json")
    return results


def retrieve(
    run: str | Path,
    query: str,
    data: str | None = None,
    *,
    top: int = 5,
    split: str = "test",
    data_dir: str | None = None,
    output: str | Path | None = None,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """The `top` images that best match `query` (rank, image index, name, score, a caption).

    Searches the run's held-out images by default; `output` saves them as a picture.
    """
    from selfsup.engine.device import resolve_device
    from selfsup.image.methods.clip import load_clip

    if not query.strip():
        raise SelfsupError("the query is empty: give a caption to search for")
    if top < 1:
        raise SelfsupError(f"--top must be at least 1, got {top}")
    pairs = held_out_pairs(run, data, split, data_dir)
    model = load_clip(run).to(resolve_device(device))
    scores = (model.encode_images(pairs.images.x) @ model.encode_texts([query]).T).flatten()
    best = scores.topk(min(top, len(scores)))
    groups = pairs.images.y.tolist()  # type: ignore[union-attr]
    hits = []
    for rank, (score, i) in enumerate(
        zip(best.values.tolist(), best.indices.tolist(), strict=True)
    ):
        name = pairs.names[i] if pairs.names else f"image {i}"
        caption = pairs.captions[groups[i]][0]
        hits.append(
            {"rank": rank + 1, "index": i, "name": name, "score": score, "caption": caption}
        )
    if output is not None:
        _picture(query, pairs.images.x[best.indices], hits, Path(output))
    return hits


def _picture(query: str, images: torch.Tensor, hits: list[dict[str, Any]], out: Path) -> None:
    import textwrap

    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.2 * len(hits), 2.9), layout="constrained")
    fig.suptitle(f"“{textwrap.shorten(query, 90)}”", fontsize=10)
    axes = fig.subplots(1, len(hits), squeeze=False)[0]
    for ax, image, hit in zip(axes, images, hits, strict=True):
        draw.show(ax, image.float() / 255)
        name = hit["name"] if len(hit["name"]) <= 26 else hit["name"][:25] + "…"
        ax.set_title(f"{hit['rank']}. {hit['score']:.2f}\n{name}", fontsize=8)
    draw.save(fig, out)
