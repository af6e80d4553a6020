"""The loop of the stages that train on a file in epochs (sft, reward, dpo, simpo, kto), on any
local Hugging Face causal LM: their options' checks (`checked_config`), then the engine's
Lightning Trainer (`engine.trainer.build_trainer`: devices, precision, progress, last.ckpt,
Ctrl-C hint) with the stage's loss in a LightningModule, validating, writing RUN/metrics.csv,
checkpointing and exporting RUN/hf after every epoch, and resuming from the last epoch
(`fit_stage`). With `--devices N` (N > 1) N processes train (Lightning's DDP, forked once the data
and any reference log-probabilities are ready: gloo on a CPU, NCCL on GPUs): --batch-size stays
the whole batch, each process takes a contiguous share of it and weighs its loss by the share of
what the loss averages over (rows, or labelled tokens: `TokenMean`), so that the all-reduced
gradient is the whole batch's and N processes train as one would; rank 0 writes the run folder.
`--accumulate K` cuts each process's share again, into K micro-batches weighed the same way, and
adds their gradients up before one optimiser step (Lightning's manual optimisation): one step on
the whole batch, holding the activations of one micro-batch at a time (kto refuses it: its
reference point is the whole batch's KL estimate).
A run folder of an earlier version (checkpoints/last.pt) resumes too: its checkpoint becomes
last.ckpt first (`convert_legacy`).
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from torch.utils.data import DataLoader, Sampler

from selfsup.core import run as rundir
from selfsup.core.errors import NonFiniteLossError, SelfsupError
from selfsup.engine.accumulate import average_gradients
from selfsup.engine.distributed import check_devices, gather_objects, share
from selfsup.engine.optim import warmup_cosine
from selfsup.engine.progress import show_bars
from selfsup.engine.trainer import ResumeHint, build_trainer
from selfsup.lm.data.chat_data import IGNORE, add_chat_tokens
from selfsup.lm.data.context import check_fits, context_length
from selfsup.lm.data.conversations import (
    Ranking,
    tokenize_chat,
)
from selfsup.lm.models import hf, lora
from selfsup.lm.options import TuneConfig, check_declared


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
    if config.batch_size % config.accumulate:
        raise SelfsupError(
            f"--batch-size {config.batch_size} is not divisible by --accumulate "
            f"{config.accumulate}: each step's batch is cut into that many equal micro-batches"
        )
    hf.check_accelerator(config.accelerator)
    hf.check_precision(config.precision)
    check_devices(config.accelerator, config.devices)  # before Lightning starts the processes
    lora.check(config)  # --lora-r: peft installed
    if config.resume:  # a missing or damaged checkpoint: one line before the model loads
        resume_checkpoint(Path(config.out))
    return config


LAST = Path(rundir.CHECKPOINTS) / rundir.LAST_CHECKPOINT  # RUN/checkpoints/last.ckpt
LEGACY = Path(rundir.CHECKPOINTS) / "last.pt"  # what earlier versions wrote instead
EARLY = {"eval.csv"}  # what a stage writes before its first checkpoint, beside rundir.EARLY


def resume_checkpoint(run: Path) -> dict[str, Any]:
    """The checkpoint `--resume RUN` continues: last.ckpt, or an earlier version's last.pt, read
    with weights_only=True; one line when it is missing, damaged or another kind."""
    if (run / LAST).is_file():
        state = rundir.load_checkpoint(run / LAST)
        if "rng" not in state:
            raise SelfsupError(f"{run / LAST} is not a checkpoint of a selfsup lm stage")
        return state
    if (run / LEGACY).is_file():
        return rundir.load_checkpoint(run / LEGACY, needs=("model",), what="selfsup checkpoint")
    _claim(run, resume=True)  # says what is missing (and how to start afresh), writes nothing
    raise AssertionError("unreachable: the claim of a run without a checkpoint fails")


def _claim(out: str | Path, resume: bool) -> rundir.RunFolder:
    """The run folder, checked and locked (`RunFolder.claim`); a resumed one continues
    last.ckpt or an earlier version's last.pt."""
    run = Path(out)
    legacy = resume and not (run / LAST).is_file() and (run / LEGACY).is_file()
    checkpoint = str(LEGACY if legacy else LAST)
    return rundir.RunFolder.claim(run, resume=resume, early=EARLY, checkpoint=checkpoint)


def convert_legacy(run: Path) -> None:
    """An earlier version's RUN/checkpoints/last.pt (model, optimizer, schedule, epoch, rng) as
    the last.ckpt Lightning resumes from (its loop state from Lightning's own migration of
    checkpoints that count `epoch` and `global_step`); last.pt goes once last.ckpt is written."""
    from lightning.pytorch.utilities.migration import migrate_checkpoint

    state = resume_checkpoint(run)
    try:
        epochs, steps = int(state["epoch"]) + 1, int(state["schedule"]["last_epoch"])
        checkpoint, _ = migrate_checkpoint(
            {
                "pytorch-lightning_version": "1.5.0",
                "epoch": epochs,
                "global_step": steps,
                "state_dict": {f"model.{k}": v for k, v in state["model"].items()},
                "optimizer_states": [state["optimizer"]],
                "lr_schedulers": [state["schedule"]],
                "rng": state["rng"],
            }
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SelfsupError(f"{run / LEGACY}: not a selfsup checkpoint (no {e})") from None
    for count in checkpoint["loops"]["fit_loop"]["epoch_progress"].values():
        count.update(ready=epochs, started=epochs, processed=epochs, completed=epochs)
    rundir.RunFolder(run).save_checkpoint(checkpoint)  # RUN/checkpoints/last.ckpt, atomically
    (run / LEGACY).unlink()


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


@dataclasses.dataclass(frozen=True)
class TokenMean:
    """A stage's loss that averages over the batch's labelled tokens (items `(ids, labels)`), not
    its rows: `fit_stage` then weighs each process's share of a batch by its tokens."""

    loss_fn: LossFn

    def __call__(self, model: Any, batch: list) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss_fn(model, batch)

    @staticmethod
    def weight(batch: list) -> int:
        """The tokens the loss averages over: labelled ones that follow a token."""
        return sum(sum(label != IGNORE for label in labels[1:]) for _, labels in batch)


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
    """Train `model` on `train` with `loss_fn` in the engine's Trainer (epochs, validation,
    RUN/metrics.csv, checkpoints, RUN/hf) into the run directory --out; returns it. With
    --lora-r the model trains through LoRA adapters (`lora.adapt`, unless the stage adapted
    it already): RUN/hf and the checkpoint keep the adapter only."""
    if stage == "kto" and config.accumulate > 1:
        raise SelfsupError(
            "--accumulate: kto's reference point is the KL estimate of the whole batch, which "
            "micro-batches do not share; leave --accumulate out"
        )
    model = lora.adapt(model, config, config.init, tokenizer)
    command = command or shlex.join(["selfsup", "lm", stage, "..."])
    folder = _begin(stage, config, command)
    run = folder.path
    hint = ResumeHint(run, f"selfsup lm {stage} --resume {shlex.quote(str(run))}")
    with folder.training(hint):  # NaN, Ctrl-C: one line; a failed first run leaves nothing
        return _train(run, hint, stage, config, model, tokenizer, train, val, loss_fn, extra)


def _begin(stage: str, config: TuneConfig, command: str) -> rundir.RunFolder:
    """The run folder, claimed and begun: a fresh one with config and command, or the resumed
    one with the command added and an earlier version's checkpoint converted."""
    folder = _claim(config.out, bool(config.resume))  # locked until the stage returns
    folder.begin(None if config.resume else {"stage": stage, **dataclasses.asdict(config)}, command)
    if folder.checkpoint == str(LEGACY):
        convert_legacy(folder.path)
        folder.checkpoint = str(LAST)
    return folder


def _train(
    run: Path,
    hint: ResumeHint,
    stage: str,
    config: TuneConfig,
    model: Any,
    tokenizer: Any,
    train: list,
    val: list,
    loss_fn: LossFn,
    extra: dict[str, float] | None,
) -> Path:
    engine = SimpleNamespace(  # full float32 by default, on a GPU too (as before)
        accelerator=config.accelerator,
        devices=config.devices,
        precision=config.precision or "32-true",
        progress=config.progress,
    )
    trainer = build_trainer(
        run,
        engine,
        hint=hint,
        processes="fork",  # with --devices N: forked once the examples are ready
        checkpoint=dict(filename="last", save_last=False, enable_version_counter=False),
        metrics=False,  # StageModule writes RUN/metrics.csv: one row an epoch
        callbacks=[ExportHF(run, tokenizer)],
        max_epochs=config.epochs,
        gradient_clip_val=1.0 if config.accumulate == 1 else None,  # else StageModule clips
        use_distributed_sampler=False,  # every process draws the whole batch, takes its share
    )
    steps = math.ceil(len(train) / config.batch_size)
    module = StageModule(
        run, stage, config, model, loss_fn, extra, steps, show_bars(config.progress)
    )
    loaders = [
        DataLoader(
            items,
            batch_size=config.batch_size,
            sampler=sampler,  # None: in file order (validation)
            collate_fn=list,
            generator=torch.Generator(),  # the global generator draws dropout masks only
        )
        for items, sampler in ((train, EpochOrder(len(train), config.seed)), (val, None))
    ]
    trainer.fit(
        module,
        loaders[0],
        loaders[1] if val else None,
        ckpt_path=str(run / LAST) if config.resume else None,
        weights_only=True,
    )
    return run


class EpochOrder(Sampler[int]):
    """Indices in the order np.random.default_rng(seed + epoch) draws; Lightning sets the epoch
    (`set_epoch`) before each one, a resumed run's too."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng(self.seed + self.epoch).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


class StageModule(L.LightningModule):
    """A stage's model and loss for the Trainer: AdamW with warm-up then cosine per step, a NaN
    loss stopped in one line, after every epoch one row (epoch, train_loss, validation means
    weighted by batch, `extra`) in RUN/metrics.csv and on stdout; the dropout RNG is in the
    checkpoint, so a resumed run draws the masks of an uninterrupted one. Several processes each
    take their share of every batch, --accumulate cuts it into micro-batches (`parts`); the
    losses logged are the whole batch's."""

    def __init__(
        self,
        run: Path,
        stage: str,
        config: TuneConfig,
        model: Any,
        loss_fn: LossFn,
        extra: dict[str, float] | None,
        steps_per_epoch: int,
        bars: bool,
    ) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self.run, self.stage, self.config, self.extra, self.bars = (
            run, stage, config, extra or {}, bars,
        )  # fmt: skip
        self.steps_per_epoch = steps_per_epoch
        self.losses: list[float] = []
        self.val: dict[str, list[float]] = {}
        self.weights: list[int] = []
        self.strict_loading = not lora.is_adapted(model)  # LoRA: the checkpoint has the adapter
        self.weight: Callable[[list], float] = getattr(loss_fn, "weight", len)
        # --accumulate: the micro-batches and the optimiser step in `accumulated_step`
        self.automatic_optimization = config.accumulate == 1

    def parts(self, batch: list) -> list[tuple[list, float]]:
        """This process's rows of a batch every process drew whole, cut into --accumulate
        micro-batches, each with the weight of its mean loss in the whole batch's (its share of
        the rows or tokens that averages over, times the processes: DDP averages the
        gradients); [(batch, 1.0)] in one process without accumulation."""
        world, k = self.trainer.world_size, self.config.accumulate
        if world == 1 and k == 1:
            return [(batch, 1.0)]
        total = self.weight(batch)
        if not total:  # nothing to learn from anywhere: every process meets the stage's error
            return [(batch, 1.0 / world)]
        mine = batch[share(len(batch), self.trainer.global_rank, world)]
        micro = [mine[share(len(mine), j, k)] for j in range(k)]
        return [(m, world * self.weight(m) / total) for m in micro]

    def _loss(self, part: list, scale: float) -> tuple[torch.Tensor, dict[str, float], float]:
        """(loss to back-propagate, the part's metrics, its weight in the whole batch's mean)."""
        if scale == 0:  # a share without rows or tokens: zero gradients, as DDP needs a backward
            if getattr(self.loss_fn, "collective", False):  # KTO: its all-reduce needs everyone
                self.loss_fn(self.model, part)
            trained = [p for p in self.model.parameters() if p.requires_grad]
            return (
                sum((p.sum() * 0.0 for p in trained), torch.zeros((), device=self.device)),
                {},
                0.0,
            )
        loss, extra = self.loss_fn(self.model, part)
        return loss if scale == 1 else loss * scale, extra, scale / self.trainer.world_size

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The module's weights; of an adapted model only those that train (the base is
        --init's, rebuilt on --resume)."""
        state = super().state_dict(*args, **kwargs)
        if not lora.is_adapted(self.model):
            return state
        kept = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if k in kept}

    def configure_optimizers(self) -> Any:
        c = self.config
        trained = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapters
        optimizer = torch.optim.AdamW(trained, lr=c.lr, weight_decay=c.weight_decay)
        total = self.steps_per_epoch * c.epochs
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(max(1, min(c.warmup_steps, total)), total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return batch  # items of the stage's own kind: its loss puts the tensors on the device

    def on_fit_start(self) -> None:
        self.model.train()

    def on_train_epoch_start(self) -> None:
        self.model.train()
        self.losses, self.val, self.weights = [], {}, []

    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor:
        if self.automatic_optimization:
            loss, _, _ = self._loss(*self.parts(batch)[0])
            self.check_finite(loss, batch)
            return loss
        return self.accumulated_step(batch)

    def accumulated_step(self, batch: list) -> torch.Tensor:
        """One optimiser step on the gradients of --accumulate micro-batches, added up (each
        weighed by its part of the whole batch: exactly one step on it), clipped to norm 1."""
        model = self.trainer.strategy.model
        losses = []
        with model.no_sync() if hasattr(model, "no_sync") else nullcontext():  # synced below
            for part, scale in self.parts(batch):
                if scale:  # a micro-batch without rows or tokens adds nothing
                    loss, _, _ = self._loss(part, scale)
                    self.manual_backward(loss)
                    losses.append(loss.detach())
        loss = torch.stack(losses).sum() if losses else torch.zeros((), device=self.device)
        self.check_finite(loss, batch)
        trained = [p for p in self.model.parameters() if p.requires_grad]
        for p in trained:  # every process all-reduces every gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        average_gradients(trained)
        optimizer = self.optimizers()
        optimizer.step()  # type: ignore[union-attr]
        optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        self.lr_schedulers().step()  # type: ignore[union-attr]
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """--accumulate: the gradient norm clipped to 1, as the Trainer's gradient_clip_val."""
        if not self.automatic_optimization:
            self.clip_gradients(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")

    def check_finite(self, loss: torch.Tensor, batch: list) -> None:
        """The whole batch's loss, logged; a NaN or infinite one stops the stage in one line."""
        whole = loss.item()
        if self.trainer.world_size > 1:  # the whole batch's loss, known to every process
            whole = sum(gather_objects(whole)) / self.trainer.world_size
        if not math.isfinite(whole):  # RunFolder.training adds what is kept
            raise NonFiniteLossError(
                f"the {self.stage} loss became {whole} in epoch {self.current_epoch + 1}; "
                "lower --lr"
            )
        self.losses.append(whole)
        self.log("loss", self.losses[-1], prog_bar=True, logger=False, batch_size=len(batch))

    def validation_step(self, batch: list, batch_idx: int) -> None:
        weight, sums = 0.0, {"loss": 0.0}
        for part, scale in self.parts(batch):  # micro-batches too: the memory of training's
            loss, extra, w = self._loss(part, scale)  # KTO: a share without rows takes part
            if w:  # a share without rows or tokens is left out
                mean = loss.item() / (w * self.trainer.world_size)
                for k, v in {"loss": mean, **extra}.items():
                    sums[k] = sums.get(k, 0.0) + w * v
                weight += w
        means = {k: v / weight for k, v in sums.items()} if weight else {"loss": 0.0}
        for k, v in whole_batch(weight, means).items():
            self.val.setdefault(f"val_{k}", []).append(v)
        self.weights.append(len(batch))

    def on_train_epoch_end(self) -> None:  # after validation, before the checkpoint
        row: dict[str, Any] = {"epoch": self.current_epoch + 1}
        row["train_loss"] = float(np.mean(self.losses))
        row.update({k: float(np.average(v, weights=self.weights)) for k, v in self.val.items()})
        row.update(self.extra)
        if not self.trainer.is_global_zero:
            return
        rundir.RunFolder(self.run).append_metrics(row)
        line = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
        )
        if self.bars:
            from tqdm.auto import tqdm

            tqdm.write(line)
        else:
            print(line)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        torch.set_rng_state(checkpoint["rng"])  # dropout continues as if never interrupted


def whole_batch(weight: float, means: dict[str, float]) -> dict[str, float]:
    """A batch's means from every process's share of it: the shares' means weighted by their
    part of the batch (`weight`, shares without any left out); `means` in one process."""
    shares = [(w, m) for w, m in gather_objects((weight, means)) if w]
    if len(shares) == 1:
        return shares[0][1]
    return {k: sum(w * m[k] for w, m in shares) for k in shares[0][1]}


class ExportHF(Checkpoint):
    """RUN/hf after every epoch. A Checkpoint callback: Lightning runs it after ModelCheckpoint
    has written last.ckpt (a kill in between leaves an export one epoch behind, redone)."""

    def __init__(self, run: Path, tokenizer: Any) -> None:
        self.run, self.tokenizer = run, tokenizer

    def on_train_epoch_end(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.is_global_zero:
            hf.save_hf(self.run, module.model, self.tokenizer)
