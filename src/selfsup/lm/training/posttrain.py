"""The loop of the stages that train on a file in epochs (sft, reward, dpo), on any local
Hugging Face causal LM: their options' checks (`checked_config`), then one loop on Lightning
Fabric (devices, precision) with a progress bar, validating and checkpointing after every
epoch, resuming from the last epoch, and exporting RUN/hf (`fit_stage`).
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from selfsup.core import run as rundir
from selfsup.core.errors import NonFiniteLossError, SelfsupError
from selfsup.engine.optim import warmup_cosine
from selfsup.lm.data.chat_data import add_chat_tokens
from selfsup.lm.data.context import check_fits, context_length
from selfsup.lm.data.conversations import (
    Ranking,
    tokenize_chat,
)
from selfsup.lm.models import hf
from selfsup.lm.options import TuneConfig, check_declared, check_one_device


def split_validation(items: Sequence[Any], fraction: float, what: str) -> tuple[list, list]:
    if not 0 <= fraction < 1:
        raise SelfsupError(f"--val-fraction must be in [0, 1), got {fraction}")
    n_val = round(len(items) * fraction)
    if len(items) - n_val < 1:
        raise SelfsupError(f"--data has {len(items)} {what}: too few to train on")
    return list(items[: len(items) - n_val]), list(items[len(items) - n_val :])


def checked_config(config: TuneConfig) -> TuneConfig:
    """The options' checks, before any file is read or written; `--resume RUN` becomes the run
    to write (`resume=True`, the older form, means the one in --out)."""
    if config.resume is True:
        config = dataclasses.replace(config, resume=config.out)
    elif config.resume:
        if config.out and Path(config.out) != Path(config.resume):
            raise SelfsupError(
                f"--resume {config.resume} continues that run; --out {config.out} names another"
            )
        config = dataclasses.replace(config, out=config.resume)
    if config.resume:  # the run's own options, as it recorded them, where none is given
        saved = _saved_config(Path(config.out))
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        config = dataclasses.replace(
            config,
            **{
                name: saved[name]
                for name, default in defaults.items()
                if name in saved
                and name not in ("out", "resume")
                and getattr(config, name) in (default, "")
            },
        )
    for name in ("init", "data", "out"):
        if not getattr(config, name):
            raise SelfsupError(f"--{name} is required")
    check_declared(config)  # the ranges its fields declare
    hf.check_accelerator(config.accelerator)
    hf.check_precision(config.precision)
    check_one_device(config.devices)
    if config.resume:  # a missing or damaged checkpoint: one line before the model loads
        run = Path(config.out)
        if not (run / hf.CHECKPOINT).is_file():
            hf.start_run(run, {}, "", resume=True)  # says what is missing, writes nothing
        hf.load_checkpoint(run)
    return config


def _saved_config(run: Path) -> dict[str, Any]:
    import yaml

    try:
        saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}  # the checks below say what is missing
    return saved if isinstance(saved, dict) else {}


def cut_hint(config: TuneConfig, context: int | None) -> str:
    return (
        f"--max-length {config.max_length} does not cut it: pass --max-length {context} to cut "
        "longer conversations"
    )


def check_rankings_fit(
    tokenizer: Any, rankings: Sequence[Ranking], config: TuneConfig, model: Any
) -> None:
    """One line naming the first ranking whose prompt and answer, cut to --max-length, still
    exceed the model's context (only a --max-length beyond the context lets that happen)."""
    context = context_length(model)
    if context is None or config.max_length <= context:
        return
    for r in rankings:
        for completion in r.completions:
            ids, _ = tokenize_chat(tokenizer, r.conversation(completion))
            length = min(len(ids), config.max_length)
            what = "a prompt with its answer"
            check_fits(length, context, r.where, what, cut_hint(config, context))


def reward_of(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar rewards of right-padded conversations (the score at each one's last token)."""
    positions = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
    return (
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        .logits[:, 0]
        .float()
    )


def prepare_chat(model: Any, tokenizer: Any) -> None:
    """Give `tokenizer` selfsup's chat markers (growing `model`'s embeddings when they are new)
    and `model` its padding and end ids (sft, reward)."""
    if add_chat_tokens(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    set_special_ids(model, tokenizer)


def set_special_ids(model: Any, tokenizer: Any) -> None:
    """The model's (and its generation config's) padding and end ids from the tokenizer."""
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


LossFn = Callable[[Any, list], tuple[torch.Tensor, dict[str, float]]]


@rundir.releases_run_locks
def fit_stage(
    stage: str,
    config: TuneConfig,
    command: str | None,
    model: Any,
    tokenizer: Any,
    train: list,
    val: list,
    loss_fn: LossFn,
    extra: dict[str, float] | None = None,
) -> Path:
    """Train `model` on `train` with `loss_fn` in posttrain's loop (Fabric, epochs, validation,
    checkpoints, RUN/hf) into the run directory --out; returns it (sft, reward, dpo)."""
    command = command or shlex.join(["selfsup", "lm", stage, "..."])
    run = hf.start_run(
        config.out, {"stage": stage, **dataclasses.asdict(config)}, command, bool(config.resume)
    )
    try:
        with hf.removed_unless_kept(run, lambda r: (r / hf.CHECKPOINT).is_file()):
            return _train(run, stage, config, model, tokenizer, train, val, loss_fn, extra)
    except KeyboardInterrupt:  # the CLI prints it after "interrupted"
        raise KeyboardInterrupt(interrupted_hint(run, stage)) from None


def interrupted_hint(run: Path, stage: str) -> str:
    """What a Ctrl-C kept and how to go on: the last checkpoint and the command that resumes
    it, or (before the first epoch ended) that the same command starts afresh."""
    if (run / hf.CHECKPOINT).is_file():
        return (
            f"the last checkpoint is {run / hf.CHECKPOINT}; continue with: selfsup lm {stage} "
            f"--resume {shlex.quote(str(run))}"
        )
    return (
        "before the end of the first epoch, nothing to resume: run the same command again to "
        f"start afresh in {run}"
    )


def _train(
    run: Path,
    stage: str,
    config: TuneConfig,
    model: Any,
    tokenizer: Any,
    train: list,
    val: list,
    loss_fn: LossFn,
    extra: dict[str, float] | None,
) -> Path:
    import lightning as L

    fabric = L.Fabric(accelerator=config.accelerator, devices=1, precision=config.precision)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(max(1, min(config.warmup_steps, total)), total)
    )
    progress = config.progress if config.progress is not None else sys.stderr.isatty()
    start_epoch = 0
    if config.resume:
        state = hf.load_checkpoint(run)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch = int(state["epoch"]) + 1
        torch.set_rng_state(state["rng"])  # dropout continues as if never interrupted
    model, optimizer = fabric.setup(model, optimizer)
    for epoch in range(start_epoch, config.epochs):
        model.train()
        order = np.random.default_rng(config.seed + epoch).permutation(len(train))
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"{stage} epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
        )
        losses = []
        for step in bar:
            batch = [
                train[i] for i in order[step * config.batch_size : (step + 1) * config.batch_size]
            ]
            loss, _ = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"the {stage} loss became {loss.item()} in epoch {epoch + 1}; lower --lr"
                    + (
                        f"; the last good epoch is in {run / hf.CHECKPOINT}"
                        if (run / hf.CHECKPOINT).is_file()
                        else f"; nothing is kept ({run} is removed)"
                    )
                )
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            fabric.clip_gradients(model, optimizer, max_norm=1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
        row.update(_validate(model, val, config.batch_size, loss_fn))
        row.update(extra or {})
        hf.append_metrics(run, row)
        print(
            ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
            )
        )
        module = model.module if hasattr(model, "module") else model
        hf.save_checkpoint(
            run,
            {
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "epoch": epoch,
                "rng": torch.get_rng_state(),
            },
        )
        hf.save_hf(run, module, tokenizer)
    return run


@torch.no_grad()
def _validate(model: Any, val: list, batch_size: int, loss_fn: LossFn) -> dict[str, float]:
    if not val:
        return {}
    model.eval()
    totals: dict[str, list[float]] = {"val_loss": []}
    weights = []
    for s in range(0, len(val), batch_size):
        batch = val[s : s + batch_size]
        loss, extra = loss_fn(model, batch)
        totals["val_loss"].append(loss.item())
        for k, v in extra.items():
            totals.setdefault(f"val_{k}", []).append(v)
        weights.append(len(batch))
    return {k: float(np.average(v, weights=weights)) for k, v in totals.items()}
