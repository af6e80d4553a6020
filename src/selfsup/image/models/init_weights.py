"""`--init-weights FILE`: a backbone's starting weights from a timm or torchvision state dict
(safetensors, or a weights-only torch file) or another selfsup run's encoder.safetensors.

Keys are mapped by the prefix that fits the backbone best: a raw timm/torchvision state dict
has none (selfsup's timm:/torchvision: backbones hold it as `model.`), a selfsup encoder's keys
start with `backbone.` (its `mean`/`std` are the data's and are not loaded: the new run has its
own). A classifier head the backbone lacks (`fc.`, `head.`, `classifier.`) is dropped.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

from selfsup.core.errors import SelfsupError

HEADS = ("fc", "head", "head_dist", "classifier")
# prefixes a file's keys may carry beyond the backbone's own (selfsup encoder, DDP, wrappers)
PREFIXES = ("", "backbone.", "model.", "module.", "backbone.model.", "module.model.")
WRAPPERS = ("state_dict", "model", "module")  # checkpoints that nest the state dict
SHOWN = 8  # keys listed in an error line


def read_init_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of FILE (safetensors or a weights-only torch file), in one line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise SelfsupError(f"--init-weights {path}: no such file")
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header size, then JSON
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as e:  # safetensors raises several types for a damaged file
            raise SelfsupError(
                f"--init-weights {path}: not a readable safetensors file ({e})"
            ) from None
    else:
        state = _torch_weights(path)
    state = _unwrap(state)
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    ):
        raise SelfsupError(
            f"--init-weights {path}: holds no state dict (names -> tensors); save "
            "model.state_dict() with torch.save or safetensors"
        )
    return state


def _torch_weights(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SelfsupError(
            f"--init-weights {path}: holds pickled objects beyond tensors, which selfsup never "
            "unpickles; save model.state_dict() (torch.save) or a safetensors file"
        ) from None
    except Exception as e:  # torch raises several types for a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SelfsupError(
            f"--init-weights {path}: neither safetensors nor a torch file ({first})"
        ) from None


def _unwrap(state: object) -> object:
    """The state dict inside a checkpoint that nests it ({'state_dict': ...}, {'model': ...})."""
    while isinstance(state, dict) and not any(isinstance(v, Tensor) for v in state.values()):
        inner = next((state[k] for k in WRAPPERS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    return state


def load_init_weights(
    backbone: nn.Module, path: str | Path, *, partial: bool = False, what: str = "--backbone"
) -> None:
    """Load FILE into `backbone`: one line for missing or unexpected keys (unless `partial`)
    and for the first key whose shape differs."""
    state, names = map_keys(read_init_weights(path), backbone)
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]  # as the backbone names them
    unexpected = [names[k] for k in state if k not in own]  # as the file names them
    if (missing or unexpected) and not partial:
        listed = "; ".join(
            f"{label} {len(keys)}: {', '.join(keys[:SHOWN])}{', ...' if len(keys) > SHOWN else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        )
        raise SelfsupError(
            f"--init-weights {path} does not fit {what} ({listed}); pass --init-weights-partial "
            "to load the keys that match"
        )
    for key, value in state.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise SelfsupError(
                f"--init-weights {path}: {key} has shape {tuple(value.shape)}, {what} needs "
                f"{tuple(own[key].shape)}"
            )
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def map_keys(
    state: dict[str, Tensor], backbone: nn.Module
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(`state` with its keys named as `backbone`'s, each new name's name in the file): the
    prefix stripped (or added) that matches most of its keys; classifier-head keys the
    backbone lacks dropped."""
    own = set(backbone.state_dict())

    def renamed(strip: str, add: str) -> dict[str, str]:
        """New name -> the file's: keys under `strip` renamed, the others kept as they are
        (then unexpected), but a selfsup encoder's data statistics."""
        data_stats = ("mean", "std") if strip.startswith("backbone.") else ()
        return {
            add + k[len(strip) :] if k.startswith(strip) else k: k
            for k in state
            if k not in data_stats
        }

    options = [(s, a) for s in PREFIXES for a in ("", "model.")]
    names = max((renamed(s, a) for s, a in options), key=lambda d: len(own & d.keys()))
    kept = {
        k: state[old]
        for k, old in names.items()
        if k in own or k.removeprefix("model.").split(".")[0] not in HEADS
    }
    return kept, names
