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
    Hub id: its copy in the local cache, never downloaded here; `load_tokenizer_and` downloads)."""
    name, source = str(path), model_source(path)
    if isinstance(source, Path):
        return source
    cached = _hub_cache(name)
    if cached is not None and (cached / "config.json").is_file():
        return cached  # a Hub id already downloaded: read offline from the cache
    raise SelfsupError(_unreachable(name))


def model_source(path: str | Path) -> Path | str:
    """What `from_pretrained` reads: the HF folder of a run directory (RUN/hf) or a local HF
    folder (a Path), or a Hub id `owner/name` that is no local path (the str)."""
    name, path = str(path), Path(path)
    if (path / HF_DIR / "config.json").is_file():
        return path / HF_DIR
    if (path / "config.json").is_file():
        return path
    if not path.exists():
        if is_hub_id(name):
            return name
        raise SelfsupError(f"{name} does not exist")
    raise SelfsupError(
        f"{path} holds no Hugging Face model (no config.json in it or in {path / HF_DIR})"
    )


def is_hub_id(name: str) -> bool:
    """`owner/name` whose owner is not a local folder (runs/sft is a mistyped run)."""
    import re

    return bool(re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", name)) and not Path(name).parent.exists()


def _hub_cache(name: str) -> Path | None:
    """The local Hugging Face cache's copy of Hub id `name` (never downloaded), or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the cache, or not a valid id
        return None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, now or when huggingface_hub was imported."""
    import os

    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(
        (f or "").upper() in {"1", "ON", "YES", "TRUE"} for f in flags
    )


def _unreachable(name: str, why: str = "") -> str:
    """Why Hub id `name` could not be loaded (`why`: `_not_fetched`'s error name), and what to
    pass instead: one line."""
    if why in {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"}:
        return (
            f"{name}: no such model on the Hugging Face Hub, or it is private or gated "
            f"(log in with `hf auth login`), and no local folder of that name; pass a local folder"
        )
    reason = (
        "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
        if hub_offline()
        else "it is not in the local Hugging Face cache and the Hub could not be reached"
    )
    return (
        f"{name} is no local folder, and Hub ids need a network ({reason}): pass a local "
        f"folder instead (download it where there is one: hf download {name} --local-dir FOLDER)"
    )


def quiet_transformers() -> None:
    """No load reports (e.g. "score.weight newly initialized") and no "Loading weights" /
    "Writing model shards" bars from transformers on stderr: selfsup prints what it did."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_tokenizer_and(path: str | Path, auto_class: Any, **kwargs: Any) -> tuple[Any, Any]:
    """(tokenizer, model) from a run directory, a local HF folder, or a Hub id through
    transformers' own cache (downloaded when not there, unless HF_HUB_OFFLINE is set)."""
    from transformers import AutoTokenizer

    quiet_transformers()
    folder = model_source(path)
    local = isinstance(folder, Path) or hub_offline()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=local)
        model = auto_class.from_pretrained(str(folder), local_files_only=local, **kwargs)
    except Exception as e:  # missing, truncated, foreign or pickled (not weights-only) files
        if isinstance(folder, str) and _not_fetched(e):
            raise SelfsupError(_unreachable(folder, _not_fetched(e))) from None
        raise SelfsupError(f"{folder}: cannot load the model ({one_line_reason(e)})") from None
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise SelfsupError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model only "
            f"{model.get_input_embeddings().num_embeddings} embeddings: they do not belong together"
        )
    return tokenizer, model


def _not_fetched(e: BaseException | None) -> str:
    """The name of the error (or of one it was raised from) that says a Hub file could not be
    had: offline, no network, not in the cache, no such repository; "" when none does."""
    names = ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError",
             "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError",
             "ConnectError", "HfHubHTTPError", "EntryNotFoundError")  # fmt: skip
    while e is not None:
        found = [c.__name__ for c in type(e).__mro__ if c.__name__ in names]
        if found:
            return found[0]
        if "offline" in str(e).lower() or "couldn't connect" in str(e).lower():
            return "OfflineModeIsEnabled"
        e = e.__cause__ or e.__context__
    return ""


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


def local_config(folder: str | Path, what: str, model_type: str, expected: str) -> Any:
    """The config of the local checkpoint `folder` (read offline), which must be a `model_type`
    one (`expected` names it); one line naming `what` (an option, or "run") otherwise."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SelfsupError(f"{what} {folder}: no config.json there; expected a local checkpoint")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises several types for a bad config
        raise SelfsupError(
            f"{what} {folder}/config.json is not readable ({one_line_reason(e)})"
        ) from None
    if config.model_type != model_type:
        raise SelfsupError(
            f"{what} {folder}: a {config.model_type!r} checkpoint; expected {expected}"
        )
    return config


def local_weights(folder: str | Path, auto_class: Any, what: str) -> Any:
    """`auto_class.from_pretrained` of the local checkpoint `folder` (read offline); one line
    naming `what` when its weights are missing, damaged or pickled."""
    quiet_transformers()
    try:
        return auto_class.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises several types for missing or damaged weights
        raise SelfsupError(
            f"{what} {folder}: the weights could not be loaded ({one_line_reason(e)})"
        ) from None
