"""The run directory: the unit a user keeps (config, command, checkpoints, metrics, weights).

RUN/
  config.yaml          the PretrainConfig plus what was learned about the data
  command.txt          the exact command line
  checkpoints/         Lightning checkpoints (last.ckpt + the latest epoch), atomic writes
  metrics.csv          per-step and per-epoch metrics (CSVLogger)
  samples/             pictures (augmented views, ...)
  encoder.safetensors  the encoder's weights, exported after every epoch
  eval/<data>/         evaluation results (JSON, CSV, plots)
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from selfsup.errors import SelfsupError

CONFIG = "config.yaml"
ENCODER = "encoder.safetensors"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"


def publish(tmp: str, path: Path) -> None:
    """Give the temporary file the usual permissions (mkstemp makes it private), then rename."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


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
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SelfsupError(f"{path} is not valid YAML ({e.__class__.__name__})") from None
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


def export_encoder(encoder: torch.nn.Module, path: Path) -> None:
    """Encoder weights as safetensors (atomically)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_encoder(run: str | Path) -> torch.nn.Module:
    """The trained encoder of a run (eval mode), rebuilt from its config and safetensors weights."""
    from selfsup.models import Encoder

    config = read_config(run)
    weights = Path(run) / ENCODER
    if not weights.is_file():
        raise SelfsupError(f"{weights} is missing: the run has not finished an epoch yet")
    encoder = Encoder(**config["encoder"])
    try:
        state = load_file(weights)
    except Exception as e:  # safetensors raises several types for a damaged file
        raise SelfsupError(f"{weights} is not a readable safetensors file ({e})") from None
    encoder.load_state_dict(state)
    return encoder.eval()


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """A Lightning checkpoint loaded with weights_only=True, or a one-line error saying why not."""
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
