"""The run directory: the unit a user keeps (config, command, checkpoints, metrics, weights).

RUN/
  config.yaml          the PretrainConfig plus what was learned about the data
  command.txt          the exact command line
  checkpoints/         Lightning checkpoints (last.ckpt + the latest epoch), atomic writes
  metrics.csv          per-step and per-epoch metrics (CSVLogger)
  samples/             pictures (augmented views, ...)
  encoder.safetensors  the encoder's weights, exported after every epoch
  eval/<data>/         evaluation results (JSON, CSV, plots)

Beside it, while a command writes into RUN, `.RUN.lock` (see `lock_run`): one writer at a time.
"""

from __future__ import annotations

import fcntl
import functools
import os
import pickle
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from selfsup.core.errors import SelfsupError

if TYPE_CHECKING:  # torch is imported where it is used: the run lock and folder checks load fast
    pass

CONFIG = "config.yaml"
ENCODER = "encoder.safetensors"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
RUN_INFO = "run_info.json"  # wall time, throughput and versions of each session


def apply_umask(path: str | Path) -> None:
    """Give a file, or a folder and everything in it, the permissions `open`/`mkdir` would have
    given under the umask: mkstemp, mkdtemp and safetensors' `save_file` make files private."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def publish(tmp: str | Path, path: Path) -> None:
    """Give the temporary file (or folder) the usual permissions, then rename it to `path`."""
    apply_umask(tmp)
    os.replace(tmp, path)


def atomic_save(path: str | Path, write: Callable[[str], object]) -> None:
    """`write(name)` a temporary file beside `path`, then `publish` it there: for writers that
    take a file name (safetensors' `save_file`, TorchScript, ONNX), never half-written and with
    the umask's permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


RUN_ENV = "SELFSUP_RUN"  # the run directory, handed by the first process to the ones it launches


def is_first_process() -> bool:
    """False in the extra processes of a multi-process run, known before any process group exists.

    Lightning's script launcher re-runs the command with LOCAL_RANK=1.. (and NODE_RANK), torchrun
    sets RANK and SLURM sets SLURM_PROCID; a plain process has none of them.
    """
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        if os.environ.get(name, "0") not in ("", "0"):
            return False
    return True


F = TypeVar("F", bound=Callable[..., Any])
_HELD: dict[str, tuple[int, int, int]] = {}  # lock file -> (fd, times taken, owner's PID)
_SCOPES: list[list[str]] = []  # the locks each running `releases_run_locks` call took


def lock_file(run: str | Path) -> Path:
    """The lock of a run folder, `.NAME.lock` beside it (not inside it: clearing or removing
    the folder must never remove a lock that is held)."""
    real = Path(os.path.realpath(run))
    return real.parent / f".{real.name}.lock"


def lock_run(run: str | Path) -> None:
    """Make this process the only writer of `run` until the innermost `releases_run_locks`
    function returns (for the process's life outside one); a second writer is refused in one
    line naming the holder's PID. An `flock`, so the OS drops it when its holder dies (kill -9
    included): a stale lock is taken over. Re-entrant; the processes a multi-process run
    launches (`is_first_process` False) share their first process's lock."""
    if not is_first_process():
        return
    path = lock_file(run)
    key = str(path)
    if key in _HELD and _HELD[key][2] == os.getpid():
        fd, count, pid = _HELD[key]
        _HELD[key] = (fd, count + 1, pid)
    else:
        _HELD[key] = (_acquire(path, run), 1, os.getpid())
    if _SCOPES:
        _SCOPES[-1].append(key)


def _acquire(path: Path, run: str | Path) -> int:
    # By hand, not `filelock`: it truncates the file before trying the lock, so a refused
    # process would erase the PID it is about to report.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SelfsupError(f"{run}: cannot create the run folder ({e.strerror})") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise SelfsupError(
                f"{run}: cannot create its lock {path} ({e.strerror}); the folder holding the "
                "run folder must be writable"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SelfsupError(
                f"{run} is in use by another selfsup process (PID {holder}, lock {path}); wait "
                "for it to end or stop it, then try again"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder removed (or replaced) after we opened it
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _release(key: str) -> None:
    fd, count, pid = _HELD[key]
    if count > 1:
        _HELD[key] = (fd, count - 1, pid)
        return
    del _HELD[key]
    if pid == os.getpid():  # not a forked child's inherited copy
        try:
            if os.path.samestat(os.fstat(fd), os.stat(key)):
                os.unlink(key)  # still locked: whoever opens it next retries on a new file
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def run_locks() -> Iterator[None]:
    """The run locks taken (`lock_run`) inside the block are released when it ends."""
    _SCOPES.append([])
    try:
        yield
    finally:
        for key in reversed(_SCOPES.pop()):
            _release(key)


@contextmanager
def run_locked(run: str | Path) -> Iterator[None]:
    """`run` locked (`lock_run`) for the block."""
    with run_locks():
        lock_run(run)
        yield


def releases_run_locks(fn: F) -> F:
    """Decorator: the run locks `fn` takes with `lock_run` are released when it returns."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with run_locks():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def inside_run(run: str | Path, *parts: str) -> Path:
    """RUN/parts..., refused in one line when a symlink on the way leads outside the run folder
    (a planted RUN/eval -> /elsewhere must not make a command write there)."""
    path = Path(run).joinpath(*parts)
    try:
        real, real_run = path.resolve(), Path(run).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise SelfsupError(f"{path}: cannot resolve it ({e})") from None
    if not real.is_relative_to(real_run):
        raise SelfsupError(
            f"{path} leads outside the run folder {run} (to {real}) through a symbolic link; "
            "remove the link"
        )
    return path


def slug(name: str) -> str:
    """A data spec as a folder name: 'npz:../data/cifar10' -> 'cifar10'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name.split(":")[-1].strip("/").split("/")[-1]) or "data"


def default_run_dir(method: str, data: str) -> Path:
    name = slug(data).strip("-") or "data"
    return Path("runs") / f"{method}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_config(run: Path, config: dict[str, Any]) -> None:
    atomic_write_text(run / CONFIG, yaml.safe_dump(config, sort_keys=False))


def read_config(run: str | Path) -> dict[str, Any]:
    path = Path(run) / CONFIG
    if not Path(run).is_dir():
        raise SelfsupError(f"run directory {run} does not exist")
    if not path.is_file():
        raise SelfsupError(f"{path} is missing: {run} is not a selfsup run directory")
    from selfsup.core.config import read_yaml  # the one reader: depth and duplicate keys checked

    config = read_yaml(path)
    if not isinstance(config, dict) or "encoder" not in config:
        raise SelfsupError(f"{path} has no 'encoder' section: not a selfsup run config")
    return config


def input_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of the images a run's encoder was trained on."""
    dataset = config["dataset"]
    return dataset["channels"], *dataset["image_size"]


def write_command(run: Path, command: str, *, append: bool = False) -> None:
    """Record the command line; a resumed run adds its command below the first."""
    path = run / "command.txt"
    before = path.read_text() if append and path.is_file() else ""
    atomic_write_text(path, before + command + "\n")


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """A Lightning checkpoint loaded with weights_only=True, or a one-line error saying why not."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = (
            "it holds Python objects: refused unread by weights-only loading; selfsup never "
            "unpickles checkpoints it did not write"
            if "global" in str(e).lower()
            else "damaged or another format"
        )
        raise SelfsupError(f"{path} is not a readable checkpoint ({reason})") from None
    except Exception as e:  # torch raises several types for truncated or corrupt files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SelfsupError(f"{path} is not a readable checkpoint ({first})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise SelfsupError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return checkpoint


def last_checkpoint(run: str | Path) -> Path | None:
    path = Path(run) / CHECKPOINTS / LAST_CHECKPOINT
    return path if path.is_file() else None


def record_run_info(run: Path, seconds: float, images: int, device: str = "") -> None:
    """Append this session's wall time, throughput and library versions to RUN/run_info.json."""
    import json

    path = Path(run) / RUN_INFO
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        info = {}
    sessions = info.get("sessions", []) if isinstance(info, dict) else []
    sessions.append(
        {
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_seconds": round(seconds, 2),
            "images": images,
            "images_per_second": round(images / seconds, 1) if seconds > 0 else None,
            "device": device,
            "versions": versions(),
        }
    )
    atomic_write_text(path, json.dumps({"sessions": sessions}, indent=2) + "\n")


def versions() -> dict[str, str]:
    """The versions of Python and of the libraries a run's results depend on."""
    import contextlib
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("selfsup", "torch", "lightning", "transformers", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out
