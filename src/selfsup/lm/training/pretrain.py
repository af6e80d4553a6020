"""`pretrain_lm()`: corpus -> tokenizer -> token ids -> model -> Lightning -> run directory.

Every transformer language model (`selfsup lm pretrain gpt|bert`) trains through this one
entry. A model kind is a `LanguageModule` (selfsup.lm.models.base) registered in
`selfsup.lm.methods.PRETRAIN`, with its own `Options`, `SPECIAL_TOKENS` (what its tokenizer
needs, e.g. "[MASK]") and `build(config, options, tokenizer, init)`; it draws its own batches
from the memory-mapped token ids (`make_batch`), computes its loss (`loss`) and writes its
exports (`export`); this file does the rest.

RUN/
  config.yaml        LMConfig + the kind's options + the tokenizer's size
  command.txt        the exact command line(s)
  tokenizer.json     the tokenizer (AutoTokenizer.from_pretrained(RUN) loads it)
  tokens.npy         the corpus's token ids (memory-mapped; the last --val-fraction validates)
  checkpoints/       last.ckpt and best.ckpt (lowest validation loss), atomic writes
  metrics.csv        train/loss, train/lr every few steps, val/loss at every evaluation
  results.json       the final validation estimate (--final-eval-batches batches)
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from selfsup.core import run as rundir
from selfsup.core.config import check_fields
from selfsup.core.errors import SelfsupError
from selfsup.core.tokenizer import KINDS, TOKENIZER_FILE, load_tokenizer, train_tokenizer
from selfsup.engine.progress import duration, show_bars
from selfsup.engine.trainer import ResumeHint, build_trainer
from selfsup.lm.data.corpus import encode_corpus, load_ids, read_texts, split_ids
from selfsup.lm.methods import PRETRAIN
from selfsup.lm.models.base import LanguageModule
from selfsup.lm.models.hf import check_accelerator, one_line_reason
from selfsup.lm.options import LMConfig, check_ranges

TOKENS = "tokens.npy"
RESULTS = "results.json"
BEST = "best"


def model_kind(name: str) -> type[LanguageModule]:
    """The class of a kind `pretrain_lm` trains (word2vec has a loop of its own)."""
    kinds = [k for k in PRETRAIN if "entry" not in PRETRAIN.about(k)]
    if name in PRETRAIN and name not in kinds:
        entry = f"{PRETRAIN[name].split(':')[0]}.{PRETRAIN.about(name)['entry']}"
        raise SelfsupError(f"model {name!r} trains through its own entry, {entry}")
    if name not in kinds:
        raise SelfsupError(f"model {name!r} is unknown; expected one of {', '.join(kinds)}")
    return PRETRAIN.load(name)


class StepBatches(Dataset):
    """Batch number `step` is drawn with a generator seeded by (seed, step): any step's batch
    is the same in a resumed run as in an uninterrupted one. Under data parallelism every
    process draws the same batch and keeps its own slice of rows, so W processes take the same
    batches as one process with the whole batch."""

    def __init__(
        self, module: LanguageModule, ids: np.ndarray, batch_size: int, seed: int, share=True
    ):
        self.module, self.ids, self.batch_size, self.seed = module, ids, batch_size, seed
        self.share = share  # False: every process gets whole batches

    def __getitem__(self, step: int) -> Any:
        rng = np.random.default_rng([self.seed, step])
        batch = self.module.make_batch(self.ids, rng, self.batch_size)
        trainer = self.module._trainer
        if not self.share or trainer is None or trainer.world_size == 1:
            return batch
        return rows_of(batch, trainer.global_rank, trainer.world_size)


def rows_of(batch: Any, rank: int, world: int) -> Any:
    """Process `rank`'s contiguous share of every tensor's rows (in tuples, lists and dicts)."""
    if isinstance(batch, Tensor):
        share = len(batch) // world
        return batch[rank * share : (rank + 1) * share]
    if isinstance(batch, dict):
        return {k: rows_of(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(rows_of(v, rank, world) for v in batch)
    return batch


class StepSampler(Sampler[int]):
    """Yields step numbers from the trainer's current step up to `stop`.

    Lightning may re-iterate the loader within a resumed run (it counts a resumed epoch's
    batches from the checkpoint); starting at the current step keeps every batch in place.
    """

    def __init__(self, module: LanguageModule, start: int, stop: int) -> None:
        self.module, self.start, self.stop = module, start, stop

    def __iter__(self):
        first = self.module.global_step if self.module._trainer is not None else self.start
        return iter(range(first, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def step_loader(module, ids, batch_size: int, seed: int, start: int, stop: int) -> DataLoader:
    return DataLoader(
        StepBatches(module, ids, batch_size, seed),
        sampler=StepSampler(module, start, stop),
        batch_size=None,
    )


def lm_config(model: str = "gpt", **settings: Any) -> LMConfig:
    """LMConfig for a model kind: the kind's own `defaults`, then `settings`."""
    kind = model_kind(model)
    if "corpus" in settings:  # the name before `data` (issue 19)
        settings["data"] = settings.pop("corpus")
    return LMConfig(model=model, **{**kind.defaults, **settings})


@rundir.releases_run_locks
def pretrain_lm(
    config: LMConfig | None = None,
    options: Any = None,
    *,
    command: str | None = None,
    **settings: Any,
) -> Path:
    """Pretrain a language model; returns the run directory.

    `pretrain_lm(model="gpt", data="shakespeare.txt", steps=500)` is the same as
    `selfsup lm pretrain gpt --data shakespeare.txt --steps 500`; the kind's own options go
    in `options` (e.g. `selfsup.lm.models.gpt.Options(n_layer=2)`), checked against the ranges
    their fields declare.
    """
    config = dataclasses.replace(config, **settings) if config else lm_config(**settings)
    kind = model_kind(config.model)
    options = options if options is not None else kind.Options()
    command = command or f"pretrain_lm({config!r}, {options!r})"
    if config.resume:
        return _resume(config, kind, command)
    _check(config, options)
    run = Path(config.out) if config.out else _default_run_dir(config)
    config = dataclasses.replace(config, out=str(run))
    folder = rundir.RunFolder.claim(run, resume=False, early=EARLY_FILES)
    tokenizer, init = _tokenizer_and_init(config, kind)
    texts = read_texts(config.data, config.encoding, config.text_field)  # type: ignore[arg-type]
    if tokenizer is None:
        tokenizer = train_tokenizer(
            texts, config.tokenizer, config.vocab_size, special_tokens=kind.SPECIAL_TOKENS
        )
    L.seed_everything(config.seed, verbose=False)
    module = kind.build(config, options, tokenizer, init)
    # Token ids go to a temporary file beside the run; the run directory appears only after
    # every check has passed.
    run.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=run.parent, prefix=f".{run.name}."))
    saved = {**asdict(config), "options": asdict(module.options), "tokenizer_size": len(tokenizer)}
    with folder.removed_unless_kept():
        try:
            ids = encode_corpus(tokenizer, texts, scratch / TOKENS)
            del texts
            module.check_data(*split_ids(ids, config.val_fraction))
            folder.begin(saved, command)
            os.replace(scratch / TOKENS, run / TOKENS)
        finally:
            for leftover in scratch.iterdir():
                leftover.unlink()
            scratch.rmdir()
        tokenizer.save_pretrained(str(run))
        return _fit(folder, config, module, tokenizer)


# What pretrain_lm writes before its first checkpoint, beside config, command and metrics.
EARLY_FILES = frozenset(
    {TOKENS, TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"}
)


def _check(config: LMConfig, options: Any) -> None:
    check_ranges(config)  # (the command line checks these and the options before torch loads)
    check_fields(options)
    check_accelerator(config.accelerator)
    if config.tokenizer not in KINDS and not (Path(config.tokenizer) / TOKENIZER_FILE).is_file():
        raise SelfsupError(
            f"--tokenizer {config.tokenizer!r}: expected {' or '.join(KINDS)}, or a folder "
            f"holding a {TOKENIZER_FILE}"
        )


def _tokenizer_and_init(config: LMConfig, kind: type[LanguageModule]) -> tuple[Any, Any]:
    """The tokenizer to reuse (None: train one) and the kind's `--init` state (or None)."""
    init = kind.load_init(config.init) if config.init else None
    if config.tokenizer not in KINDS:
        tokenizer = load_tokenizer(config.tokenizer)
    elif config.init:
        tokenizer = load_tokenizer(config.init)
    else:
        return None, None
    source = config.tokenizer if config.tokenizer not in KINDS else config.init
    if init is not None and len(tokenizer) > init.vocab_size:
        raise SelfsupError(
            f"vocabulary mismatch: the tokenizer in {source} has {len(tokenizer)} tokens but the "
            f"--init checkpoint {config.init} has {init.vocab_size} embeddings"
        )
    return tokenizer, init


def _default_run_dir(config: LMConfig) -> Path:
    corpus = Path(str(config.data)).stem or "corpus"
    return Path("runs") / f"lm-{config.model}-{corpus}-{time.strftime('%Y%m%d-%H%M%S')}"


def read_lm_config(run: str | Path) -> tuple[LMConfig, Any, dict[str, Any]]:
    """(LMConfig, the kind's Options, the whole saved dict) of a language-model run."""
    path = Path(run) / rundir.CONFIG
    if not path.is_file():
        raise SelfsupError(f"{path} is missing: {run} is not a selfsup language-model run")
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise SelfsupError(f"{path} is not readable YAML ({one_line_reason(e)})") from None
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("options"), dict)
        or "model" not in saved
    ):
        raise SelfsupError(f"{path} is not a language-model run config (no 'model'/'options')")
    fields = {f.name for f in dataclasses.fields(LMConfig)}
    if "corpus" in saved:  # runs from before `data` was named so (issue 19)
        saved.setdefault("data", saved.pop("corpus"))
    try:
        config = LMConfig(**{k: v for k, v in saved.items() if k in fields})
        if config.model == "gpt":  # GPT runs from before --activation used the tanh GELU
            saved["options"].setdefault("activation", "gelu_new")
        options = model_kind(config.model).Options(**saved["options"])
    except TypeError as e:  # an option this version does not know
        raise SelfsupError(f"{path}: {one_line_reason(e)}") from None
    return config, options, saved


def _resume(config: LMConfig, kind: type[LanguageModule], command: str) -> Path:
    folder = rundir.RunFolder.claim(str(config.resume), resume=True, early=EARLY_FILES)
    saved_config, options, _ = read_lm_config(folder.path)
    # truncated, foreign or pickled: one line, before any write
    start = int(folder.load_checkpoint(needs=("state_dict", "global_step"))["global_step"])
    # Only the length of training may change on resume (to extend a finished run).
    steps = config.steps if config.steps != LMConfig.steps else saved_config.steps
    run = str(folder.path)
    config = dataclasses.replace(saved_config, steps=steps, out=run, resume=None, init=None)
    tokenizer = load_tokenizer(folder.path)
    L.seed_everything(config.seed, verbose=False)
    module = kind.build(config, options, tokenizer, None)
    folder.begin(None, command)
    return _fit(folder, config, module, tokenizer, start=start)


def _fit(
    folder: rundir.RunFolder,
    config: LMConfig,
    module: LanguageModule,
    tokenizer: Any,
    start: int = 0,
) -> Path:
    """Train from step `start` (a resumed run's checkpoint step; its metrics rows below it kept)."""
    run = folder.path
    train_ids, val_ids = split_ids(load_ids(run / TOKENS), config.val_fraction)
    keep_before = start if folder.resumed else None
    hint = ResumeHint(run, f"selfsup lm pretrain {config.model} --resume {run}")
    tokens = _tokens_per_step(config, module.options)
    trainer = _trainer(config, run, hint, keep_before, tokens)
    if config.batch_size % trainer.world_size:
        raise SelfsupError(
            f"--batch-size {config.batch_size} does not split evenly over "
            f"{trainer.world_size} processes"
        )
    train = step_loader(module, train_ids, config.batch_size, config.seed, start, config.steps)
    val = DataLoader(  # the same batches at every validation
        StepBatches(module, val_ids, config.batch_size, config.seed + 1),
        sampler=range(config.eval_batches),
        batch_size=None,
    )
    if trainer.accelerator.__class__.__name__ == "CPUAccelerator":
        torch.set_num_threads(cpu_threads(config.threads, module))
    began = time.perf_counter()
    with folder.training(hint):
        trainer.fit(
            module,
            train,
            val,
            ckpt_path=str(folder.last) if folder.resumed else None,
            weights_only=True,
        )
    seconds = time.perf_counter() - began
    results = final_estimate(run, config, module, val_ids)
    results["train_seconds"] = round(seconds, 2)  # periodic validation included
    results["steps_per_second"] = round((config.steps - start) / seconds, 2)
    module.export(run, tokenizer)
    rundir.atomic_write_text(run / RESULTS, json.dumps(results, indent=2) + "\n")
    return run


SMALL_MODEL = 5_000_000  # parameters: below this one CPU thread is fastest (see `cpu_threads`)


def cpu_threads(threads: int, module: Any) -> int:
    """--threads, or (0) the count chosen for this model: 1 for a small model (the baby GPT,
    0.8M parameters: 84 ms a step on one thread, 422 ms on two, on a busy 2-core machine),
    else torch's count less the cores other processes keep busy (the 1-minute load)."""
    if threads:
        return threads
    if sum(p.numel() for p in module.parameters()) < SMALL_MODEL:
        return 1
    busy = int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - busy))


@torch.no_grad()
def evaluate_loss(module: LanguageModule, ids: np.ndarray, batches: int, seed: int) -> dict:
    """Mean loss and metrics over `batches` batches drawn from `ids` (the final estimate)."""
    was_training = module.training
    module.eval()
    totals: dict[str, float] = {}
    dataset = StepBatches(module, ids, module.config.batch_size, seed, share=False)
    for step in range(batches):
        batch = _to_device(dataset[step], module.device)
        loss, metrics = module.loss(batch)
        for name, value in {"loss": loss, **metrics}.items():
            totals[name] = totals.get(name, 0.0) + float(value) / batches
    module.train(was_training)
    return totals


def final_estimate(run: Path, config: LMConfig, module: LanguageModule, val_ids) -> dict:
    """Validation estimate of the final weights and of the best checkpoint on the same
    --final-eval-batches batches; the module keeps whichever is lower (it is then exported)."""
    seed = config.seed + 2
    final = evaluate_loss(module, val_ids, config.final_eval_batches, seed)
    results: dict[str, Any] = {
        "steps": config.steps,
        "eval_batches": config.final_eval_batches,
        "final": final,
        "kept": "final",
    }
    best_path = run / rundir.CHECKPOINTS / f"{BEST}.ckpt"
    best_ckpt = (
        torch.load(best_path, map_location=module.device, weights_only=True)
        if best_path.is_file()
        else None
    )
    if best_ckpt is not None and best_ckpt["global_step"] == config.steps:  # the final weights
        results["best"] = {**final, "step": config.steps}
    elif best_ckpt is not None:
        last_state = {k: v.clone() for k, v in module.state_dict().items()}
        module.load_state_dict(best_ckpt["state_dict"])
        best = evaluate_loss(module, val_ids, config.final_eval_batches, seed)
        results["best"] = {**best, "step": int(best_ckpt["global_step"])}
        if best["loss"] < final["loss"]:
            results["kept"] = "best"
        else:
            module.load_state_dict(last_state)
    results["val_loss"] = results[results["kept"]]["loss"]
    return results


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _trainer(
    config: LMConfig, run: Path, hint: ResumeHint, keep_before: int | None = None, tokens: int = 0
) -> L.Trainer:
    """The engine's Trainer counted in steps: validation every --eval-interval steps (its lowest
    val/loss kept as best.ckpt beside last.ckpt), gradient clipping, one forked process per
    device (after the run directory and token ids are ready: a re-run command would prepare
    them again in every process)."""
    progress = show_bars(config.progress)
    return build_trainer(
        run,
        config,
        hint=hint,
        processes="fork",
        checkpoint=dict(
            filename=BEST,
            monitor="val/loss",
            mode="min",
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        callbacks=[ValidationLines(config.steps, bar=progress, tokens=tokens)],
        keep_before=keep_before,
        csv=dict(drop=("epoch",), flush_logs_every_n_steps=config.eval_interval),
        bar=dict(refresh_rate=max(1, min(20, config.steps // 100))),
        max_steps=config.steps,
        max_epochs=-1,
        use_distributed_sampler=False,  # StepBatches shares each batch out itself
        log_every_n_steps=max(1, min(50, config.eval_interval // 5)),
        val_check_interval=config.eval_interval,
        check_val_every_n_epoch=None,
        gradient_clip_val=config.grad_clip or None,
    )


def _tokens_per_step(config: LMConfig, options: Any) -> int:
    """Tokens a training step reads (a batch of blocks), for the speed lines."""
    length = getattr(options, "block_size", None) or getattr(options, "max_length", 0)
    return config.batch_size * int(length)


class ValidationLines(Callback):
    """Prints the speed (tokens/s, threads, time to go) a few seconds after training starts,
    and `step N/STEPS: val/loss X` after each periodic validation with the speed since the
    start (above the progress bar when there is one), so that a log shows how training goes."""

    FIRST_AFTER = 3.0  # seconds of training before the first speed line

    def __init__(self, steps: int, bar: bool, tokens: int = 0) -> None:
        self.steps, self.bar, self.tokens = steps, bar, tokens
        self.began: tuple[float, int] | None = None  # (time, step) after the first step
        self.told = False

    def speed(self, step: int) -> str:
        if self.began is None or step <= self.began[1]:
            return ""
        rate = (step - self.began[1]) / (time.perf_counter() - self.began[0])
        tokens = f"{rate * self.tokens:,.0f} tokens/s, " if self.tokens else ""
        threads = (
            f"{torch.get_num_threads()} CPU thread{'s' * (torch.get_num_threads() > 1)}, "
            if not torch.cuda.is_available()
            else ""
        )
        left = f", about {duration((self.steps - step) / rate)} to go" if step < self.steps else ""
        return f"{tokens}{rate:.2f} steps/s, {threads}".rstrip(", ") + left

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        step = trainer.global_step
        if self.began is None:  # timed from the end of the first step (warm-up left out)
            self.began = (time.perf_counter(), step)
        elif (
            not self.told
            and step - self.began[1] >= 5  # a rate over a few steps
            and time.perf_counter() - self.began[0] >= self.FIRST_AFTER
        ):
            self.told = True
            if trainer.is_global_zero:
                self.write(f"step {step}/{self.steps}: {self.speed(step)}")

    def write(self, line: str) -> None:
        if self.bar:
            from tqdm.auto import tqdm

            tqdm.write(line)
        else:
            print(line, flush=True)

    def on_validation_end(self, trainer: L.Trainer, module: Any) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if loss is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        speed = self.speed(trainer.global_step)
        line = f"step {trainer.global_step}/{self.steps}: val/loss {float(loss):.4f}"
        self.write(line + (f" ({speed})" if speed else ""))
