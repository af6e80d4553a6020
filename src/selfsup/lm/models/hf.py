"""Hugging Face models in selfsup run directories, and the run-directory plumbing of the stages
after pretraining (SFT, reward model, RLHF).

RUN/
  config.yaml        the stage and its options
  command.txt        the exact command line (a resumed run appends)
  hf/                model + tokenizer, `save_pretrained` (safetensors): loads with the Auto classes
  checkpoints/       last.pt: weights, optimizer and progress, loaded with weights_only=True
  metrics.csv        one row per logged step (RLHF: per iteration; eval.csv: held-out)
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from selfsup.core import run as rundir
from selfsup.core.errors import SelfsupError
from selfsup.engine.device import check_accelerator  # noqa: F401  (the stages import it from here)
from selfsup.lm.options import check_number  # noqa: F401  (the stages import it from here)

HF_DIR = "hf"
CHECKPOINT = Path("checkpoints") / "last.pt"


def hf_dir(path: str | Path) -> Path:
    """The Hugging Face folder of a run directory (RUN/hf), or `path` itself when it is one (a
    Hub id: its copy in the local cache, never downloaded)."""
    name, path = str(path), Path(path)
    if (path / HF_DIR / "config.json").is_file():
        return path / HF_DIR
    if (path / "config.json").is_file():
        return path
    if not path.exists():
        cached = _hub_cache(name)
        if cached is not None and (cached / "config.json").is_file():
            return cached  # a Hub id already downloaded: read offline from the cache
        raise SelfsupError(_missing(name))
    raise SelfsupError(
        f"{path} holds no Hugging Face model (no config.json in it or in {path / HF_DIR})"
    )


def _hub_id(name: str) -> bool:
    """`owner/name` whose owner is not a local folder (runs/sft is a mistyped run)."""
    import re

    return bool(re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", name)) and not Path(name).parent.exists()


def _hub_cache(name: str) -> Path | None:
    """The local Hugging Face cache's copy of Hub id `name` (never downloaded), or None."""
    if not _hub_id(name):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the cache, or not a valid id
        return None


def _missing(name: str) -> str:
    """Why `name` is no model folder: a Hub id (owner/name) not in the local cache needs a
    network, which selfsup never uses; anything else does not exist."""
    import os

    if not _hub_id(name):
        return f"{name} does not exist"
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return (
        f"{name} is no local folder, and Hub ids need a network{offline}: selfsup reads local "
        f"folders only; download it where there is one (hf download {name} --local-dir FOLDER) "
        "and pass FOLDER"
    )


def quiet_transformers() -> None:
    """No load reports (e.g. "score.weight newly initialized") and no "Loading weights" /
    "Writing model shards" bars from transformers on stderr: selfsup prints what it did."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_tokenizer_and(path: str | Path, auto_class: Any, **kwargs: Any) -> tuple[Any, Any]:
    """(tokenizer, model) from a run directory or a local HF folder -- never from the hub."""
    from transformers import AutoTokenizer

    quiet_transformers()
    folder = hf_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = auto_class.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as e:  # missing, truncated, foreign or pickled (not weights-only) files
        raise SelfsupError(f"{folder}: cannot load the model ({one_line_reason(e)})") from None
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise SelfsupError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model only "
            f"{model.get_input_embeddings().num_embeddings} embeddings: they do not belong together"
        )
    return tokenizer, model


def one_line_reason(e: Exception) -> str:
    """One line on why a model or checkpoint file could not be read."""
    import pickle

    if isinstance(e, pickle.UnpicklingError):
        return (
            "a pickled file that is not plain weights: it is refused unread (weights_only); "
            "save it with safetensors"
        )
    lines = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {lines[0][:200]}" if lines else e.__class__.__name__


def save_hf(run: Path, model: Any, tokenizer: Any, name: str = HF_DIR) -> None:
    """Export model and tokenizer to RUN/NAME (default RUN/hf; written beside, then swapped in):
    what `load_tokenizer_and` reads back."""
    tmp = run / f".{name}.tmp"
    quiet_transformers()
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    rundir.apply_umask(tmp)  # safetensors writes model.safetensors private (0600)
    final = run / name
    if final.exists():
        old = run / f".{name}.old"
        final.rename(old)
        tmp.rename(final)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(final)


# What a run of these stages writes before its first checkpoint (or policy): a folder holding
# only these, and no checkpoint, is the leftover of a run that failed early and may be reused.
EARLY_FILES = frozenset({"config.yaml", "command.txt", "metrics.csv", "eval.csv", "checkpoints"})


def unfinished_start(run: Path, early: frozenset[str] = EARLY_FILES) -> bool:
    """True when `run` holds nothing but what a run that failed before its first checkpoint
    leaves (config, command, metrics, temporary exports), with a selfsup config.yaml."""
    if not (run / "config.yaml").is_file():
        return False
    for entry in run.iterdir():
        if entry.name.startswith(".") and entry.name.endswith((".tmp", ".old")):
            continue
        if entry.name not in early:
            return False
        if entry.is_dir() and any(entry.iterdir()):  # a checkpoint folder with something in it
            return False
    return True


def clear_run(run: Path) -> None:
    """Remove a run folder (one `unfinished_start` accepted, or one this process created)."""
    shutil.rmtree(run, ignore_errors=True)


def start_run(out: str | Path, config: dict[str, Any], command: str, resume: bool) -> Path:
    """Create (or, resuming, reuse) the run directory and record config and command. A folder
    left by a run that failed before its first checkpoint is cleared and reused."""
    run = Path(out)
    if resume:
        if not (run / CHECKPOINT).is_file():
            hint = (
                "; run the command without --resume to start afresh"
                if run.is_dir() and unfinished_start(run)
                else ""
            )
            raise SelfsupError(f"--resume: {run / CHECKPOINT} is missing, nothing to resume{hint}")
        load_checkpoint(run)  # a truncated or foreign checkpoint: one line, before any write
    elif run.is_file():
        raise SelfsupError(f"--out {run} is a file; expected a run directory")
    rundir.lock_run(run)  # one writer per run folder, until the stage returns
    if not resume and run.exists() and any(run.iterdir()):
        if not unfinished_start(run):
            raise SelfsupError(
                f"{run} already exists and is not empty; pick another --out or --resume"
            )
        clear_run(run)
    run.mkdir(parents=True, exist_ok=True)
    if not resume:
        rundir.atomic_write_text(run / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    rundir.write_command(run, command, append=resume)
    return run


def save_checkpoint(run: Path, state: dict[str, Any]) -> None:
    """Weights, optimizer state and progress (tensors and plain values only), atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    rundir.atomic_write_bytes(run / CHECKPOINT, buffer.getvalue())


def load_checkpoint(run: Path) -> dict[str, Any]:
    path = run / CHECKPOINT
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated, foreign or pickled file
        raise SelfsupError(
            f"{path} is not a readable selfsup checkpoint ({one_line_reason(e)})"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise SelfsupError(f"{path} is not a selfsup checkpoint (no model weights in it)")
    return state


def append_metrics(run: Path, row: dict[str, Any], name: str = "metrics.csv") -> None:
    """Add a row to RUN/NAME; the first row's keys are the header, and every row has them. A row
    whose first value (epoch, iteration) is there already replaces it and the rows after it: a
    run killed after logging an epoch but before its checkpoint repeats that epoch on resume."""
    path = run / name
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
        rundir.atomic_write_text(path, out.getvalue())
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if f.tell() == 0:
            writer.writeheader()
        writer.writerow(row)


@contextmanager
def removed_unless_kept(run: Path, kept: Any) -> Iterator[None]:
    """Remove the run folder when the block fails (a bad option found late, a NaN loss at the
    first step, ...) before `kept(run)` says it holds something worth keeping: a failed start
    must not leave a folder that blocks both a fresh run and --resume. Ctrl-C keeps it (a later
    run into it clears it, see `unfinished_start`)."""
    try:
        yield
    except Exception:
        if not kept(run):
            clear_run(run)
        raise


def check_precision(value: str | None) -> None:
    """--precision: a value Lightning knows (None: the run's default)."""
    if value is None:
        return
    from typing import get_args

    from lightning.fabric.connector import _PRECISION_INPUT_STR

    known = (*get_args(_PRECISION_INPUT_STR), "16", "32", "64", "bf16")
    if value not in known:
        raise SelfsupError(f"--precision {value!r}: expected one of {', '.join(known)}")
