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
from pathlib import Path
from typing import Any

import torch
import yaml

from selfsup import run as rundir
from selfsup.errors import SelfsupError

HF_DIR = "hf"
CHECKPOINT = Path("checkpoints") / "last.pt"


def hf_dir(path: str | Path) -> Path:
    """The Hugging Face folder of a run directory (RUN/hf), or `path` itself when it is one."""
    path = Path(path)
    if (path / HF_DIR / "config.json").is_file():
        return path / HF_DIR
    if (path / "config.json").is_file():
        return path
    if not path.exists():
        raise SelfsupError(f"{path} does not exist")
    raise SelfsupError(
        f"{path} holds no Hugging Face model (no config.json in it or in {path / HF_DIR})"
    )


def load_tokenizer_and(path: str | Path, auto_class: Any, **kwargs: Any) -> tuple[Any, Any]:
    """(tokenizer, model) from a run directory or a local HF folder -- never from the hub."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # no load reports (e.g. "score.weight newly initialized")
    folder = hf_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = auto_class.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise SelfsupError(f"{folder}: cannot load the model ({str(e).splitlines()[0]})") from None
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise SelfsupError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model only "
            f"{model.get_input_embeddings().num_embeddings} embeddings: they do not belong together"
        )
    return tokenizer, model


def save_hf(run: Path, model: Any, tokenizer: Any) -> None:
    """Export model and tokenizer to RUN/hf (written beside, then swapped in)."""
    tmp = run / f".{HF_DIR}.tmp"
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    final = run / HF_DIR
    if final.exists():
        old = run / f".{HF_DIR}.old"
        final.rename(old)
        tmp.rename(final)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(final)


def start_run(out: str | Path, config: dict[str, Any], command: str, resume: bool) -> Path:
    """Create (or, resuming, reuse) the run directory and record config and command."""
    run = Path(out)
    if resume:
        if not (run / CHECKPOINT).is_file():
            raise SelfsupError(f"--resume: {run / CHECKPOINT} is missing, nothing to resume")
    elif run.exists() and any(run.iterdir()):
        raise SelfsupError(f"{run} already exists and is not empty; pick another --out or --resume")
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
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise SelfsupError(
            f"{path} is not a readable selfsup checkpoint ({e.__class__.__name__})"
        ) from None


def append_metrics(run: Path, row: dict[str, Any], name: str = "metrics.csv") -> None:
    """Add a row to RUN/NAME; the first row's keys are the header, and every row has them."""
    path = run / name
    if path.is_file():
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(row):
            raise ValueError(f"{path}: columns {header} but the row has {list(row)}")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if f.tell() == 0:
            writer.writeheader()
        writer.writerow(row)
