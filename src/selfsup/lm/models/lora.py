"""LoRA adapters through peft (`--lora-r R` on every stage that trains; the optional extra
`pip install 'selfsup[lora]'`).

A stage adapts the model it loaded (`adapt`): rank-R adapters on `--lora-targets`, the base
weights frozen; the embedding rows of selfsup's chat markers (and the padding token) learn too,
as peft's trainable tokens (they are new, randomly initialised rows when the base never saw
them), and a reward model's score head is trained whole (peft's SEQ_CLS task). At the start the
adapted model computes exactly what the base does (LoRA's B is zero).

What the run keeps: RUN/hf holds the adapter instead of a whole model -- adapter_model.safetensors
and adapter_config.json (peft's own format; `base_model_name_or_path` records the absolute path
of the base's folder: an HF folder, or the hf/ of the run it started from) beside the tokenizer.
RUN/checkpoints/last.ckpt keeps the adapter's weights and optimiser state only; `--resume`
rebuilds the base from --init and continues. `load_tokenizer_and` reads such a folder back as
one plain model, the adapter merged into its base (itself loaded the same way when it is
another LoRA run's), so a later stage, `lm chat` and `lm export --merge` see what was trained.

The stages with a frozen reference (dpo, kto, grpo, rlhf) use the base with the adapters off
(`Reference`: `model.disable_adapter()`) instead of a second copy of the model.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from selfsup.core.errors import SelfsupError
from selfsup.lm.data.chat_data import CHAT_TOKENS
from selfsup.lm.models import hf
from selfsup.lm.options import LoraOptions

ADAPTER_CONFIG = "adapter_config.json"
INSTALL = "pip install 'selfsup[lora]'"


def require_peft() -> Any:
    """The peft module, or one line saying how to install it."""
    try:
        import peft
    except ImportError:
        raise SelfsupError(f"--lora-r needs peft, which is not installed: {INSTALL}") from None
    return peft


def check(options: LoraOptions) -> None:
    """The LoRA options' checks that need no model: peft installed, --lora-targets not empty
    (the ranges are the fields' `check=`)."""
    if options.lora_r:
        require_peft()
        targets(options)


def targets(options: LoraOptions) -> str | list[str]:
    """--lora-targets as peft takes it: "all-linear" or a list of module names."""
    if options.lora_targets.strip() == "all-linear":
        return "all-linear"
    names = [n.strip() for n in options.lora_targets.split(",") if n.strip()]
    if not names:
        raise SelfsupError("--lora-targets is empty: give module names (a,b) or all-linear")
    return names


def is_adapted(model: Any) -> bool:
    """Whether `model` is a peft model (its adapters can be turned off)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


@contextmanager
def _quiet() -> Iterator[None]:
    """peft's warnings of a normal use (GPT-2's Conv1D: fan_in_fan_out set for it) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _embedding_names(model: Any) -> dict[str, str]:
    """The names of the input embedding and, when it is not tied to it, the output layer."""
    found: dict[str, str] = {}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is inputs:
            found.setdefault("in", name)
        elif module is outputs and outputs.weight is not inputs.weight:
            found.setdefault("out", name)
    return found


def adapt(model: Any, options: LoraOptions, base: str | Path, tokenizer: Any) -> Any:
    """`model` with LoRA adapters (--lora-r > 0; otherwise, or when it has them already, the
    model itself). `base` is where the model was loaded from (--init, --policy), recorded in
    the adapter's config."""
    if not options.lora_r or is_adapted(model):
        return model
    peft = require_peft()
    seq_cls = type(model).__name__.endswith("ForSequenceClassification")
    vocab = tokenizer.get_vocab()
    ids = sorted({vocab[t] for t in CHAT_TOKENS if t in vocab} | {tokenizer.pad_token_id} - {None})
    names = _embedding_names(model)
    tokens = {names[k]: ids for k in ("in", "out") if k in names} if ids else None
    recorded = _base_name(base)
    config = peft.LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha or 2 * options.lora_r,
        lora_dropout=options.lora_dropout,
        target_modules=targets(options),
        task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM",
        trainable_token_indices=tokens,
    )
    try:
        with _quiet():
            adapted = peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found in the model
        reason = hf.one_line_reason(e)
        raise SelfsupError(f"--lora-targets {options.lora_targets}: {reason}") from None
    # get_peft_model records the model's own name_or_path, which for a model merged from
    # another LoRA run is that run's base: the adapter would load without the first adapter
    adapted.peft_config["default"].base_model_name_or_path = recorded
    return adapted


class Reference:
    """An adapted model seen with its adapters off: the frozen base, the reference of DPO, KTO,
    GRPO and PPO, without a second copy of its weights. Calls run the model (`__call__`,
    `generate`) inside `disable_adapter()`; the lean decoders of `decoding` read `model` inside
    one `mode()` for a whole batch."""

    def __init__(self, model: Any, adapters: bool = False) -> None:
        self.model, self.adapters = model, adapters
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)

    @contextmanager
    def mode(self) -> Iterator[None]:
        """`model` as this reference sees it (adapters off) for the block."""
        with nullcontext() if self.adapters else self.model.disable_adapter():
            yield

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.mode():
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self.mode():
            return self.model.generate(*args, **kwargs)

    def parameters(self) -> Iterator[Any]:
        return self.model.parameters()

    def eval(self) -> Reference:
        self.model.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> Reference:
        return self

    def to(self, *args: Any, **kwargs: Any) -> Reference:
        return self


def reference(model: Any) -> Any:
    """The frozen reference of a stage's policy: the base with its adapters off when `model` is
    adapted, else None (the stage keeps a copy of its own)."""
    return Reference(model) if is_adapted(model) else None


def sampled(model: Any) -> Any:
    """`model` as the samplers should see it: itself. The lean decoders of
    `selfsup.lm.alignment.decoding` serve an adapted model by its LoRA layers' merged weights
    (W + B@A·scale, made once per sampling round; the base weights untouched), and fall back to
    `generate` where they cannot (LoRA dropout on, other adapter kinds)."""
    return model


def _base_name(base: str | Path) -> str:
    """What an adapter records as its base: a Hub id as given (any machine resolves it), else
    the absolute path of the model folder."""
    if not (Path(base) / ADAPTER_CONFIG).is_file() and not (Path(base) / hf.HF_DIR).is_dir():
        source = hf.model_source(base)
        if isinstance(source, str):
            return source
    return str(model_folder(base)[0].resolve())


def model_folder(path: str | Path) -> tuple[Path, bool]:
    """(the model folder of a run directory or folder, whether it holds an adapter)."""
    path = Path(path)
    for folder in (path / hf.HF_DIR, path):
        if (folder / ADAPTER_CONFIG).is_file():
            return folder, True
    return hf.hf_dir(path), False


def adapter_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        return config if isinstance(config, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SelfsupError(f"{folder / ADAPTER_CONFIG}: {hf.one_line_reason(e)}") from None


def load_tokenizer_and(path: str | Path, auto_class: Any, **kwargs: Any) -> tuple[Any, Any]:
    """`hf.load_tokenizer_and` for a run or folder that may hold a LoRA adapter: its base
    (loaded the same way), the embeddings grown to the run's tokenizer, the adapter merged in:
    one plain model."""
    folder, adapter = model_folder(path)
    if not adapter:
        return hf.load_tokenizer_and(path, auto_class, **kwargs)
    peft = require_peft()
    from transformers import AutoTokenizer

    config = adapter_config(folder)
    base = config.get("base_model_name_or_path")
    if not base or not (Path(base).exists() or hf.is_hub_id(base)):
        raise SelfsupError(
            f"{folder}: the adapter's base model {base} (base_model_name_or_path in "
            f"{ADAPTER_CONFIG}) does not exist"
        )
    own_class, own_kwargs = auto_class, kwargs
    if config.get("task_type") == "SEQ_CLS":
        kwargs.setdefault("num_labels", 1)  # a selfsup reward model: one score
    elif auto_class.__name__ != "AutoModelForCausalLM":  # e.g. `lm reward --init LORA_SFT_RUN`
        from transformers import AutoModelForCausalLM

        own_class, own_kwargs = AutoModelForCausalLM, {}
    _, model = load_tokenizer_and(base, own_class, **own_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    for name in ("pad_token_id", "eos_token_id"):
        if getattr(model.config, name, None) is None:
            setattr(model.config, name, getattr(tokenizer, name))
    try:
        with _quiet():
            adapted = peft.PeftModel.from_pretrained(model, str(folder))
    except Exception as e:  # adapters for another base model, damaged files
        raise SelfsupError(
            f"{folder}: the adapter does not fit its base model {base} ({hf.one_line_reason(e)})"
        ) from None
    merged = adapted.merge_and_unload()
    if own_class is not auto_class:
        merged = _rehead(merged, auto_class, **kwargs)
    return tokenizer, merged


def _rehead(model: Any, auto_class: Any, **kwargs: Any) -> Any:
    """`model`'s body (the merged causal LM's) under the head `auto_class` makes (a reward
    model's new score layer), as `from_pretrained` of a causal-LM folder would give."""
    config = model.config
    for key, value in kwargs.items():
        setattr(config, key, value)
    with _quiet():
        headed = auto_class.from_config(config)
    result = headed.load_state_dict(model.state_dict(), strict=False)
    body = [k for k in result.missing_keys if not k.startswith(("score.", "classifier."))]
    if body:
        raise SelfsupError(
            f"cannot put the {type(model).__name__} under a {type(headed).__name__} head: "
            f"{len(body)} weights missing ({', '.join(body[:3])}, ...)"
        )
    return headed


def export(run: str | Path, out: str | Path, merge: bool) -> Path:
    """`selfsup lm export RUN --out DIR`: with `merge`, the run's model with its adapter merged
    (a whole model and tokenizer the Auto classes load); without, a copy of RUN/hf as it is (the
    adapter of a LoRA run, the model of any other)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SelfsupError(f"--out {out} exists and is not an empty folder")
    folder, adapter = model_folder(run)
    if not merge:
        shutil.copytree(folder, out, dirs_exist_ok=True)
        return out
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if adapter:
        seq_cls = adapter_config(folder).get("task_type") == "SEQ_CLS"
    else:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures")
        seq_cls = any(a.endswith("ForSequenceClassification") for a in architectures or ())
    auto = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    tokenizer, model = load_tokenizer_and(run, auto)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()  # empty: save_hf writes beside it and moves its folder in
    hf.save_hf(out.parent, model, tokenizer, out.name)
    return out
