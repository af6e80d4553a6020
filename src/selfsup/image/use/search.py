"""Similar images: `selfsup index RUN IMAGES -o INDEX`, then `selfsup similar INDEX IMAGE -k 8`.

The index holds the L2-normalised embeddings of a folder's images (or of one image file),
streamed in batches so the images are never all in memory, their paths and the run that made
them, as one `.npz` read with `allow_pickle=False` and checked field by field when opened
(`load_index`). `similar` embeds the query with the same encoder and returns the k nearest by
cosine similarity, by exact search (a matrix product over chunks of the index), or with
`approximate=True` through a FAISS index kept beside it as INDEX.faiss (see selfsup.image.use.ann).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.core.errors import SelfsupError, numpy_file_reason
from selfsup.image.use.exact import nearest


def build_index(
    run: str | Path,
    images: str,
    out: str | Path,
    *,
    batch_size: int = 256,
    device: str = "auto",
    approximate: bool = False,
) -> dict[str, Any]:
    """Embed the images of `images` (see `image_files`) with RUN's encoder; write `out`, and
    with `approximate` also a FAISS index beside it (OUT.faiss) for large collections."""
    from tqdm.auto import tqdm

    from selfsup.core.run import input_shape, read_config
    from selfsup.engine.device import resolve_device
    from selfsup.image.runs import load
    from selfsup.image.use import ann
    from selfsup.image.use.classify import file_batches, image_files

    if approximate:
        ann.require_faiss()  # before the work, not after
    config = read_config(run)
    shape = input_shape(config)
    encoder, device = load(run), resolve_device(device)
    encoder.to(device)
    files = image_files(images)
    features: np.ndarray | None = None  # filled in place: no second copy of the embeddings
    with torch.inference_mode():
        start, batches = 0, file_batches(files, shape, batch_size)
        for _, x in tqdm(batches, desc="index", total=-(-len(files) // batch_size), disable=None):
            y = torch.nn.functional.normalize(encoder(x.to(device)).float(), dim=1).cpu().numpy()
            if features is None:
                features = np.empty((len(files), y.shape[1]), dtype=np.float32)
            features[start : start + len(y)] = y
            start += len(y)
    assert features is not None  # image_files never returns an empty list
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # np.savez would append .npz to a name without it
        np.savez(
            f, features=features, paths=np.array(files), run=np.array(str(Path(run).resolve()))
        )
    result: dict[str, Any] = {"out": str(out), "images": len(files), "dim": features.shape[1]}
    beside = ann.faiss_path(out)
    if approximate:
        index, result["approximate"] = ann.build(features)
        ann.save(index, beside)
    else:
        beside.unlink(missing_ok=True)  # a stale one from an earlier build would not match
    return result


def load_index(path: str | Path) -> tuple[np.ndarray, list[str], str]:
    """(unit-norm features N×D, paths, run) of an index file, each field checked (the arrays'
    headers before their data is read, the width against the run's encoder); one line naming
    the file and the field otherwise."""
    from selfsup.core.run import read_config
    from selfsup.image.use.classify import meta_encoder

    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("one array, not an .npz of several")
        with z:
            headers = _headers(z, path)
            missing = [name for name in ("features", "paths", "run") if name not in headers]
            if missing:
                raise SelfsupError(f"{path}: no field {missing[0]!r}: not from `selfsup index`")
            shape, dtype = headers["features"]
            if len(shape) != 2 or dtype.kind != "f":
                raise SelfsupError(
                    f"{path}: field 'features' is {shape} {dtype}, expected N×D floats"
                )
            if headers["paths"][0] != shape[:1]:
                raise SelfsupError(
                    f"{path}: field 'paths' has shape {headers['paths'][0]} but 'features' has "
                    f"{shape[0]} rows: expected one path per row"
                )
            if shape[0] == 0:
                raise SelfsupError(f"{path}: field 'features' has no rows: an empty index")
            features, paths, run = z["features"], [str(p) for p in z["paths"]], str(z["run"])
    except (OSError, ValueError, KeyError, EOFError) as e:
        why = numpy_file_reason(path, e)
        raise SelfsupError(f"{path}: not an index written by `selfsup index` ({why})") from None
    norms = np.sqrt(np.einsum("ij,ij->i", features, features).astype(np.float64))
    bad = np.flatnonzero(~((np.abs(norms - 1) <= 1e-3) | (norms == 0)))  # NaN is bad too
    if len(bad):
        row = bad[0]
        what = (
            f"has norm {norms[row]:.4g}, expected 1 (unit-norm embeddings)"
            if np.isfinite(norms[row])
            else "holds NaN or infinite values"
        )
        raise SelfsupError(f"{path}: field 'features' {what} in row {row} ({len(bad)} such rows)")
    try:
        width = int(meta_encoder(read_config(run)["encoder"]).feature_dim)
    except SelfsupError as e:
        raise SelfsupError(f"{path}: field 'run' ({run}): {e}") from None
    if features.shape[1] != width:
        raise SelfsupError(
            f"{path}: field 'features' is {features.shape[1]}-d but the encoder of its run {run} "
            f"gives {width}-d features; rebuild it with `selfsup index`"
        )
    return features, paths, run


def _headers(z: Any, path: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each array of an open .npz, read from its header, checked against the
    bytes the file holds for it: no array is allocated at a size the file merely claims."""
    fmt = np.lib.format
    headers = {}
    for name in z.files:
        info = z.zip.getinfo(f"{name}.npy")
        with z.zip.open(info) as f:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
        if math.prod(shape) * dtype.itemsize > info.file_size:
            raise SelfsupError(
                f"{path}: field {name!r} claims shape {shape} of {dtype}, more than the "
                f"{info.file_size:,} bytes stored for it"
            )
        headers[name] = (shape, dtype)
    return headers


def search_index(
    approximate: Any, features: np.ndarray, query: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(ids, similarities, "approximate" or "exact"): through the FAISS index `approximate`
    when there is one (see `open_faiss`), else by exact search."""
    if approximate is not None:
        from selfsup.image.use import ann

        ids, scores = ann.search(approximate, query[None], k)
        keep = ids[0] >= 0  # fewer than k found
        return ids[0][keep], scores[0][keep], "approximate"
    ids, scores = nearest(features, query, k)
    return ids, scores, "exact"


def open_faiss(index: str | Path, features: np.ndarray) -> Any:
    """The FAISS index beside `index` (INDEX.faiss), checked against its features; None when
    there is none or faiss is not installed (exact search gives the same answer or a better
    one)."""
    from selfsup.image.use import ann

    beside = ann.faiss_path(index)
    if not beside.is_file():
        return None
    try:
        ann.require_faiss()
    except SelfsupError:
        return None
    return ann.load(beside, len(features), features.shape[1])


def similar(
    index: str | Path, image: str | Path, *, k: int = 8, out: str | Path | None = None
) -> dict[str, Any]:
    """The k images of the index most similar to `image`; with `out` (a .png), also a picture
    of the query and its neighbours and a CSV beside it (rank, path, similarity)."""
    from selfsup.core.run import input_shape, read_config
    from selfsup.image.runs import load
    from selfsup.image.use.classify import load_image_files

    features, paths, run = load_index(index)
    approximate = open_faiss(index, features)
    if not Path(image).is_file():
        raise SelfsupError(f"{image}: no such image file")
    config = read_config(run)
    shape = input_shape(config)
    query_image = load_image_files([str(image)], shape)
    with torch.inference_mode():
        query = torch.nn.functional.normalize(load(run)(query_image).float(), dim=1)[0].numpy()
    ids, scores, how = search_index(approximate, features, query, k)
    hits = [
        {"rank": r, "path": paths[i], "similarity": float(s)}
        for r, (i, s) in enumerate(zip(ids, scores, strict=True), 1)
    ]
    if out is not None:
        from selfsup.core.run import atomic_write_text
        from selfsup.image import draw

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
    return {"hits": hits, "picture": str(out) if out else None, "search": how}
