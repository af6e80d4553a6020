"""Similar images: `selfsup index RUN IMAGES -o INDEX`, then `selfsup similar INDEX IMAGE -k 8`.

The index holds the L2-normalised embeddings of a folder's images (streamed in batches, so the
images are never all in memory), their paths and the run that made them, as one `.npz` read
with `allow_pickle=False`. `similar` embeds the query with the same encoder and returns the k
nearest by cosine similarity, by exact search (a matrix product over chunks of the index).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.errors import SelfsupError

CHUNK = 65_536  # index rows scored at once


def build_index(
    run: str | Path, images: str, out: str | Path, *, batch_size: int = 256, device: str = "auto"
) -> dict[str, Any]:
    """Embed every image file under `images` (folder:PATH) with RUN's encoder; write `out`."""
    from tqdm.auto import tqdm

    from selfsup.api import load
    from selfsup.classify import image_files, load_image_files
    from selfsup.device import resolve_device
    from selfsup.run import input_shape, read_config

    config = read_config(run)
    shape = input_shape(config)
    encoder, device = load(run), resolve_device(device)
    encoder.to(device)
    files = image_files(images)
    chunks = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(files), batch_size), desc="index", disable=None):
            x = load_image_files(files[start : start + batch_size], shape).to(device)
            chunks.append(torch.nn.functional.normalize(encoder(x).float(), dim=1).cpu())
    features = torch.cat(chunks).numpy()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # np.savez would append .npz to a name without it
        np.savez(
            f, features=features, paths=np.array(files), run=np.array(str(Path(run).resolve()))
        )
    return {"out": str(out), "images": len(files), "dim": features.shape[1]}


def load_index(path: str | Path) -> tuple[np.ndarray, list[str], str]:
    """(unit-norm features N×D, paths, run) of an index file; one line if it is not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["features"], [str(p) for p in z["paths"]], str(z["run"])
    except (OSError, ValueError, KeyError) as e:
        raise SelfsupError(f"{path}: not an index written by `selfsup index` ({e})") from None


def nearest(features: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosine similarities) of the k rows of unit-norm `features` nearest to `query`
    (a unit vector), best first: an exact search in chunks."""
    k = min(k, len(features))
    q = torch.from_numpy(np.asarray(query, dtype=np.float32))
    best_scores, best_ids = torch.empty(0), torch.empty(0, dtype=torch.long)
    for start in range(0, len(features), CHUNK):
        scores = torch.from_numpy(features[start : start + CHUNK]) @ q
        top = scores.topk(min(k, len(scores)))
        best_scores = torch.cat([best_scores, top.values])
        best_ids = torch.cat([best_ids, top.indices + start])
        keep = best_scores.topk(min(k, len(best_scores)))
        best_scores, best_ids = keep.values, best_ids[keep.indices]
    return best_ids.numpy(), best_scores.numpy()


def similar(
    index: str | Path, image: str | Path, *, k: int = 8, out: str | Path | None = None
) -> dict[str, Any]:
    """The k images of the index most similar to `image`; with `out` (a .png), also a picture
    of the query and its neighbours and a CSV beside it (rank, path, similarity)."""
    from selfsup.api import load
    from selfsup.classify import load_image_files
    from selfsup.run import input_shape, read_config

    features, paths, run = load_index(index)
    if not Path(image).is_file():
        raise SelfsupError(f"{image}: no such image file")
    config = read_config(run)
    shape = input_shape(config)
    query_image = load_image_files([str(image)], shape)
    with torch.inference_mode():
        query = torch.nn.functional.normalize(load(run)(query_image).float(), dim=1)[0].numpy()
    ids, scores = nearest(features, query, k)
    hits = [
        {"rank": r, "path": paths[i], "similarity": float(s)}
        for r, (i, s) in enumerate(zip(ids, scores, strict=True), 1)
    ]
    if out is not None:
        from selfsup import draw
        from selfsup.run import atomic_write_text

        out = Path(out)
        shown = (
            torch.cat([query_image, load_image_files([h["path"] for h in hits], shape)]).float()
            / 255
        )
        titles = ["query", *(f"{h['similarity']:.3f}" for h in hits)]
        draw.image_sheet(shown, out, titles, columns=min(len(shown), 9))
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["rank", "path", "similarity"])
        writer.writerows([h["rank"], h["path"], f"{h['similarity']:.6f}"] for h in hits)
        atomic_write_text(out.with_suffix(".csv"), text.getvalue())
    return {"hits": hits, "picture": str(out) if out else None}
