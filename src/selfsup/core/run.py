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
`RunFolder` is the lifecycle every training command shares (claim, begin, training, finished).
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import functools
import io
import os
import pickle
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml

from selfsup.core.errors import NonFiniteLossError, SelfsupError

# torch is imported where it is used: the run lock and folder checks load fast

CONFIG = "config.yaml"
COMMAND = "command.txt"
METRICS = "metrics.csv"
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
    path = run / COMMAND
    before = path.read_text() if append and path.is_file() else ""
    atomic_write_text(path, before + command + "\n")


def load_checkpoint(
    path: Path | str, needs: Collection[str] = ("state_dict",), what: str = "checkpoint"
) -> dict[str, Any]:
    """A checkpoint loaded with weights_only=True holding the keys `needs` (Lightning's:
    state_dict), or a one-line error saying why not (`what` names it in the error)."""
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
        raise SelfsupError(f"{path} is not a readable {what} ({reason})") from None
    except Exception as e:  # torch raises several types for truncated or corrupt files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SelfsupError(f"{path} is not a readable {what} ({first})") from None
    missing = [key for key in needs if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise SelfsupError(f"{path}: not a {what} (no {missing[0]} in it)")
    return checkpoint


def last_checkpoint(run: str | Path) -> Path | None:
    path = Path(run) / CHECKPOINTS / LAST_CHECKPOINT
    return path if path.is_file() else None


# What every training run writes before its first checkpoint; a run adds its own names.
EARLY = frozenset({CONFIG, COMMAND, METRICS, CHECKPOINTS, "hparams.yaml"})


def _temporary(name: str) -> bool:
    """A file `atomic_write_bytes` or an export is writing (.NAME.XXX.tmp, .NAME.old)."""
    return name.startswith(".") and name.endswith((".tmp", ".old"))


def has_checkpoint(run: Path) -> bool:
    """RUN/checkpoints/ holds a file (temporaries aside): the run is worth keeping."""
    folder = Path(run) / CHECKPOINTS
    return folder.is_dir() and any(not _temporary(p.name) for p in folder.iterdir())


class Interruptible(Protocol):
    """What notes a Ctrl-C inside a training loop (selfsup.engine.trainer.ResumeHint)."""

    interrupted: bool

    def interruption(self, nothing_kept: str) -> BaseException: ...


@dataclasses.dataclass
class RunFolder:
    """The life of one run folder, the same for every training command:

    `claim`     checks, before anything is written: a fresh run needs a folder that is absent,
                empty or the remains of a start killed before its first checkpoint (reused);
                --resume needs the run's config and checkpoint; then the run lock (one writer)
    `begin`     writes config.yaml and command.txt (a resumed run appends its command)
    `training`  around the loop: a NaN loss or Ctrl-C ends in one line saying what is kept and
                how to continue; any failure removes a folder this run created that holds
                nothing worth keeping (`kept`): a failed first run leaves nothing behind
    `finished`  the session's wall time and throughput, in RUN/run_info.json

    Outside the first process of a multi-process run it only locks (shared) and reads.
    """

    path: Path
    early: frozenset[str] = EARLY  # what the run writes before its first checkpoint
    checkpoint: str = f"{CHECKPOINTS}/{LAST_CHECKPOINT}"  # the file --resume continues from
    kept: Callable[[Path], bool] = has_checkpoint  # the folder holds something worth keeping
    resumable: bool = True  # False: the run has no --resume (word2vec)
    resumed: bool = False
    created: bool = False  # by this call (`begin`): only then may a failure remove it

    @classmethod
    def claim(
        cls, out: str | Path, *, resume: bool, early: Collection[str] = (), **kind: Any
    ) -> RunFolder:
        """The run folder `out`, checked (one line when it cannot be used) and locked."""
        folder = cls(Path(out), early=EARLY | frozenset(early), resumed=resume, **kind)
        if resume:
            folder._check_resumable()
        elif folder.path.exists() and not folder.path.is_dir():
            raise SelfsupError(f"--out {out} is a file, not a folder; choose another --out")
        lock_run(folder.path)  # refused in one line while another process writes into it
        if not resume:
            folder._check_free()
        return folder

    @property
    def last(self) -> Path:
        """The checkpoint --resume continues from."""
        return self.path / self.checkpoint

    def remains(self) -> bool:
        """True when the folder holds only what a start killed before its first checkpoint
        leaves (a config.yaml among the `early` names, nothing worth keeping)."""
        names = {p.name for p in self.path.iterdir() if not _temporary(p.name)}
        return CONFIG in names and names <= self.early and not self.kept(self.path)

    def _check_resumable(self) -> None:
        run = self.path
        if not run.is_dir():
            raise SelfsupError(f"--resume {run}: run directory {run} does not exist")
        if not (run / CONFIG).is_file():
            raise SelfsupError(f"{run / CONFIG} is missing: {run} is not a selfsup run directory")
        if not self.last.is_file():
            afresh = (
                f"; run the command without --resume to start afresh, with --out {run}"
                if self.remains()
                else ""
            )
            raise SelfsupError(
                f"--resume {run}: no checkpoint yet ({self.last} is missing), nothing to "
                f"resume{afresh}"
            )

    def _check_free(self) -> None:
        run = self.path
        if not is_first_process() or not run.is_dir():  # later processes share the first's
            return
        if not any(not _temporary(p.name) for p in run.iterdir()) or self.remains():
            return
        if not self.kept(run):
            reason, advice = "is not empty", ""
        elif self.resumable:
            reason, advice = "holds checkpoints", f"pass --resume {run} to continue it or "
        else:
            reason, advice = "holds a finished run", ""
        raise SelfsupError(
            f"run directory {run} already exists and {reason}; {advice}choose another --out"
        )

    def begin(self, config: dict[str, Any] | None, command: str) -> None:
        """Write config.yaml and command.txt: a fresh run first clears the remains `claim`
        accepted; a resumed run appends its command below the first."""
        if not is_first_process():
            return
        if self.resumed:
            write_command(self.path, command, append=True)
            return
        try:
            if self.path.is_dir():
                for p in self.path.iterdir():
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SelfsupError(
                f"--out {self.path}: cannot create the run folder ({e.strerror})"
            ) from None
        self.created = True
        if config is not None:
            write_config(self.path, config)
        write_command(self.path, command)

    def removable(self) -> bool:
        """A failure now would remove the folder (this call created it; nothing to keep)."""
        return (
            self.created and is_first_process() and self.path.is_dir() and not self.kept(self.path)
        )

    @contextmanager
    def removed_unless_kept(self) -> Iterator[RunFolder]:
        """Any failure in the block (Ctrl-C too) removes the folder when `removable`: a failed
        start leaves no folder that blocks both a fresh run and --resume."""
        try:
            yield self
        except BaseException:
            if self.removable():
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    @contextmanager
    def training(self, hint: Interruptible | None = None) -> Iterator[RunFolder]:
        """`removed_unless_kept` around a training loop, and one line for how it stopped: a NaN
        loss says what is kept; a Ctrl-C that `hint` noted (Lightning turns it into
        SystemExit) becomes `hint.interruption`: how to continue, or that nothing is kept."""
        with self.removed_unless_kept():
            try:
                yield self
            except NonFiniteLossError as e:
                raise SelfsupError(f"{e}{self._kept_note()}") from None
            except SystemExit:
                if hint is None or not hint.interrupted:
                    raise
                raise hint.interruption(self._kept_note().removeprefix("; ")) from None

    def _kept_note(self) -> str:
        if self.removable():
            return f"; nothing is kept yet ({self.path} is removed): the same command starts afresh"
        if self.last.is_file():
            return f"; the last good checkpoint is {self.last}"
        return ""

    def finished(self, seconds: float, count: int, device: str = "") -> None:
        """Record the session (wall time, `count` images or tokens, device) in run_info.json."""
        if is_first_process():
            record_run_info(self.path, seconds, count, device)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """`state` (tensors and plain values: weights, optimiser, progress) atomically to
        `last`, for a checkpoint written outside Lightning (an earlier version's, converted)."""
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.last, buffer.getvalue())

    def load_checkpoint(
        self, needs: Collection[str] = ("state_dict",), what: str = "checkpoint"
    ) -> dict[str, Any]:
        """`last`, read weights-only (see `load_checkpoint`)."""
        return load_checkpoint(self.last, needs, what)

    def append_metrics(self, row: dict[str, Any], name: str = METRICS) -> None:
        """Add a row to RUN/NAME; the first row's keys are the header, and every row has them.
        A row whose first value (epoch, iteration) is there already replaces it and the rows
        after it: a run killed after logging an epoch but before its checkpoint repeats that
        epoch on resume."""
        path = self.path / name
        rows: list[list[str]] = []
        if path.is_file():
            with path.open(newline="") as f:
                rows = list(csv.reader(f))
            if (rows[0] if rows else []) != list(row):
                header = rows[0] if rows else []
                raise ValueError(f"{path}: columns {header} but the row has {list(row)}")
        key = str(next(iter(row.values())))
        again = next((i for i, r in enumerate(rows[1:], 1) if r and r[0] == key), None)
        if again is not None:  # rewrite without the repeated rows
            out = io.StringIO()
            csv.writer(out, lineterminator="\r\n").writerows(rows[:again])
            atomic_write_text(path, out.getvalue())
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow(row)


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
