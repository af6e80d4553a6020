""".npz members read safely: headers checked against what the file stores, only the wanted rows
materialised.

`np.load(...)["x"]` decompresses a whole member before anything can be checked: a 1 MB
`savez_compressed` of zeros becomes 4 GB even when `--limit 64` keeps 64 rows, and a header
that claims (100000, 512, 512, 3) ends in a MemoryError. numpy has no row-wise reader for
compressed members, so this streams the member through `zipfile` (which checks the CRC) and
keeps only the chosen rows.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfsup.core.errors import SelfsupError, first_line

CHUNK_BYTES = 16 * 1024**2  # bytes decompressed at a time while skipping unwanted rows


@dataclass(frozen=True)
class Member:
    """One array of an .npz file, known from its header alone."""

    path: Path
    name: str  # without .npy
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int  # bytes of the .npy header before the data

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # unreachable


def available_memory() -> int | None:
    """Bytes of memory free for this process now (None where the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def members(path: Path) -> dict[str, Member]:
    """Every array of the .npz at `path` by name, from headers only; one line for a file that
    is not an .npz, an object (pickled) array, or a header that claims more data than stored."""
    found: dict[str, Member] = {}
    try:
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                raise SelfsupError(f"{path}: a single .npy array, expected an .npz with 'x'")
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[: -len(".npy")]
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, fortran, dtype = read_header(f, max_header_size=10_000)
                    offset = f.tell()
                member = Member(path, name, tuple(shape), dtype, fortran, offset)
                if dtype.hasobject:
                    raise SelfsupError(
                        f"{path}: '{name}' holds Python objects; selfsup reads only plain "
                        "arrays (numbers, strings) from .npz files"
                    )
                if member.nbytes != info.file_size - offset:
                    raise SelfsupError(
                        f"{path}: '{name}' claims shape {member.shape} ({_human(member.nbytes)}) "
                        f"but the file stores {_human(max(0, info.file_size - offset))} for it"
                    )
                found[name] = member
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise SelfsupError(f"{path}: no such file") from None
        raise SelfsupError(f"{path}: not a readable .npz file ({first_line(e)})") from None
    if not found:
        raise SelfsupError(f"{path}: not an .npz file of arrays (no .npy members)")
    return found


def read(member: Member, rows: np.ndarray | None = None) -> np.ndarray:
    """The member's array, or only `rows` (sorted, unique indices into its first axis); the
    memory it needs is checked against what is free before any of it is allocated."""
    n = member.shape[0] if member.shape else 1
    keep = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(keep) and (keep.min() < 0 or keep.max() >= n or np.any(np.diff(keep) <= 0)):
        raise ValueError("rows must be sorted, unique indices into the first axis")
    whole = not member.shape or member.fortran  # rare, never huge in practice: read it all
    need = member.nbytes if whole else len(keep) * member.row_bytes
    free = available_memory()
    if free is not None and need > free:
        raise SelfsupError(
            f"{member.path}: '{member.name}' needs {_human(need)} in memory, {_human(free)} "
            "is free (--limit N reads fewer rows)"
        )
    if whole:
        with np.load(member.path, allow_pickle=False) as z:
            array = z[member.name]
        return array if rows is None else array[keep]
    out = np.empty((len(keep), *member.shape[1:]), dtype=member.dtype)
    step = member.row_bytes
    if not len(keep) or not step:
        return out
    try:
        with zipfile.ZipFile(member.path) as z, z.open(member.name + ".npy") as f:
            _skip(f, member.offset)
            position = 0  # the row the stream is at
            flat = out.reshape(len(keep), -1).view(np.uint8)
            for i, row in enumerate(keep.tolist()):
                _skip(f, (row - position) * step)
                _read_into(f, flat[i])
                position = row + 1
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise SelfsupError(
            f"{member.path}: '{member.name}' cannot be read ({first_line(e)})"
        ) from None
    return out


def _skip(f, nbytes: int) -> None:
    while nbytes > 0:
        chunk = f.read(min(nbytes, CHUNK_BYTES))
        if not chunk:
            raise EOFError("the data ends early")
        nbytes -= len(chunk)


def _read_into(f, buffer: np.ndarray) -> None:
    view, done = memoryview(buffer), 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise EOFError("the data ends early")
        done += got
