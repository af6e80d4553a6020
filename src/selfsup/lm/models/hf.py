"""Hugging Face models in selfsup run directories: loading, saving, checks. The run folder of
the stages after pretraining (SFT, reward model, DPO, RLHF, GRPO, ...) is
`selfsup.core.run.RunFolder`'s, as every run's; what they keep in it:

RUN/
  config.yaml        the stage and its options
  command.txt        the exact command line (a resumed run appends)
  hf/                model + tokenizer, `save_pretrained` (safetensors): loads with the Auto classes
  checkpoints/       last.ckpt (sft, reward, dpo, simpo, kto): the Lightning checkpoint (weights,
                     optimiser, schedule, loop and dropout state), loaded with weights_only=True;
                     an earlier version's last.pt is converted on --resume
  metrics.csv        one row per logged step (RLHF: per iteration; eval.csv: held-out)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfsup.core import run as rundir
from selfsup.core.errors import SelfsupError
from selfsup.engine.device import check_accelerator  # noqa: F401  (the stages import it from here)
from selfsup.lm.options import check_number  # noqa: F401  (the stages import it from here)

HF_DIR = "hf"


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


def check_precision(value: str | None) -> None:
    """--precision: a value Lightning knows (None: the run's default)."""
    if value is None:
        return
    from typing import get_args

    from lightning.fabric.connector import _PRECISION_INPUT_STR

    known = (*get_args(_PRECISION_INPUT_STR), "16", "32", "64", "bf16")
    if value not in known:
        raise SelfsupError(f"--precision {value!r}: expected one of {', '.join(known)}")
