"""`--device auto | cpu | cuda[:N] | mps`: resolved and checked in one place."""

from __future__ import annotations

import torch

from selfsup.core.errors import SelfsupError


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; a device this machine lacks is a
    one-line error (not a CUDA traceback at the first tensor moved there)."""
    name = device.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise SelfsupError(f"--device {device!r} is unknown; expected auto, cpu, cuda[:N] or mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SelfsupError(f"--device {device}: no CUDA GPU is available on this machine")
        if index and int(index) >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise SelfsupError(f"--device {device}: this machine has {count} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SelfsupError(f"--device {device}: Apple's MPS is not available on this machine")
    return name


# `--accelerator` (Lightning's names): the one list every training command checks against.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def check_accelerator(accelerator: str) -> None:
    """A one-line error for an unknown `--accelerator` or one this machine does not have."""
    name = accelerator.lower()
    if name not in ACCELERATORS:
        raise SelfsupError(
            f"--accelerator {accelerator!r} is unknown; expected one of {', '.join(ACCELERATORS)}"
        )
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise SelfsupError(
            f"--accelerator {accelerator}: no CUDA GPU is available on this machine "
            "(use cpu or auto)"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise SelfsupError(
            "--accelerator mps: Apple's MPS is not available on this machine (use cpu or auto)"
        )


def uses_cuda(accelerator: str) -> bool:
    """Whether Lightning's `accelerator` runs on CUDA GPUs here ('auto' does when one is there)."""
    name = accelerator.lower()
    return name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available())
