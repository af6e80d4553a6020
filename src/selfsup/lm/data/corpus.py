"""Text corpora: read `.txt` / JSONL files, encode them into a memory-mapped array of token ids.

The ids live in a `.npy` file opened with `mmap_mode="r"`, so a corpus larger than memory is
read on demand; training and validation are a split by position (the last 10% validates).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from selfsup.core.errors import SelfsupError, numpy_file_reason
from selfsup.core.jsonl import json_objects
from selfsup.core.run import publish  # umask permissions, then an atomic rename

TEXT_SUFFIXES = (".txt", ".jsonl")
CHUNK_CHARS = 1 << 16  # encode in ~64 kB pieces (cut at line ends): batched, in parallel


def read_texts(
    paths: str | Path | Sequence[str | Path], encoding: str = "utf-8", text_field: str = "text"
) -> list[str]:
    """The documents of a corpus, in order.

    Each path is a `.txt` file (one document), a `.jsonl` file (one document per line, in the
    `text_field` field) or a folder of such files (read in sorted path order).
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise SelfsupError("no corpus given: pass one or more .txt/.jsonl files or folders")
    texts: list[str] = []
    for file in _corpus_files(items):
        if file.suffix == ".jsonl":
            texts.extend(_read_jsonl(file, encoding, text_field))
        else:
            texts.append(_read_text(file, encoding))
    texts = [t for t in texts if t]
    if not any(t.strip() for t in texts):
        names = ", ".join(str(p) for p in items)
        raise SelfsupError(f"corpus {names} is empty: it holds no text")
    return texts


def _corpus_files(items: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not found:
                raise SelfsupError(f"corpus folder {path} holds no .txt or .jsonl files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise SelfsupError(f"corpus file {path} does not exist")
    return files


def _decode(path: Path, encoding: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except LookupError:
        raise SelfsupError(f"--encoding {encoding!r} is not a known text encoding") from None
    except UnicodeDecodeError as e:
        raise SelfsupError(
            f"{path} is not valid {encoding} text: byte {e.start} (0x{data[e.start]:02x}) "
            f"cannot be decoded; pass --encoding with the file's encoding (e.g. latin-1)"
        ) from None


def _read_text(path: Path, encoding: str) -> str:
    return _decode(path, encoding).replace("\r\n", "\n")


def _read_jsonl(path: Path, encoding: str, text_field: str) -> list[str]:
    texts = []
    for number, record in json_objects(_decode(path, encoding), path, "{path}, line {line}"):
        if not isinstance(record.get(text_field), str):
            raise SelfsupError(
                f"{path}, line {number}: expected an object with a string field {text_field!r} "
                "(choose the field with --text-field)"
            )
        texts.append(record[text_field])
    return texts


def ids_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _chunks(text: str) -> Iterator[str]:
    """Pieces of at most CHUNK_CHARS, cut after a newline where there is one."""
    start = 0
    while start < len(text):
        end = min(len(text), start + CHUNK_CHARS)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def encode_corpus(tokenizer, texts: Iterable[str], path: str | Path) -> np.memmap:
    """Token ids of all documents, concatenated, written to the `.npy` file `path`.

    Documents are separated by the tokenizer's end-of-text token when it has one. The file is
    written through a temporary file and a rename; returns it opened read-only as a memmap.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = ids_dtype(len(tokenizer))
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: batched, no special tokens added
    fd, raw = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".raw")
    count = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for text in texts:
                for encoding in backend.encode_batch(list(_chunks(text)), add_special_tokens=False):
                    np.asarray(encoding.ids, dtype=dtype).tofile(out)
                    count += len(encoding.ids)
                np.asarray(separator, dtype=dtype).tofile(out)
                count += len(separator)
        # Copy into a .npy file (its header needs the final length) so that it opens anywhere.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npy")
        os.close(fd)
        try:
            ids = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(count,))
            source = np.memmap(raw, dtype=dtype, mode="r", shape=(count,)) if count else ids
            for start in range(0, count, 1 << 24):
                ids[start : start + (1 << 24)] = source[start : start + (1 << 24)]
            ids.flush()
            del ids, source
            publish(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        Path(raw).unlink(missing_ok=True)
    return load_ids(path)


def load_ids(path: str | Path) -> np.memmap:
    """A token-id file written by `encode_corpus`, memory-mapped read-only."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SelfsupError(
            f"{path} is not a readable token-id file ({numpy_file_reason(path, e)})"
        ) from None


def split_ids(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) by position: the last `val_fraction` of the tokens validates."""
    if not 0 < val_fraction < 1:
        raise SelfsupError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    cut = len(ids) - int(round(len(ids) * val_fraction))
    return ids[:cut], ids[cut:]
