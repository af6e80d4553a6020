"""`pretrain()`: data -> method -> Lightning Trainer -> run directory."""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from tqdm import tqdm

from selfsup.core import run as rundir
from selfsup.core.errors import SelfsupError
from selfsup.engine import metrics_log
from selfsup.engine.device import check_accelerator, uses_cuda
from selfsup.engine.distributed import check_devices
from selfsup.engine.optim import OPTIMIZERS
from selfsup.engine.progress import duration, show_bars
from selfsup.engine.trainer import ResumeHint, build_trainer, seed_everything
from selfsup.image.augment import RECIPES
from selfsup.image.config import PretrainConfig, split_options
from selfsup.image.data import ImageData, batch_loader
from selfsup.image.data.multichannel import channel_stats
from selfsup.image.data.pixels import data_pixels
from selfsup.image.data.sources import HOLDOUT, stratified_indices
from selfsup.image.methods import METHODS, get_method
from selfsup.image.methods.base import Method
from selfsup.image.models.backbones import backbone_size, check_backbone
from selfsup.image.models.init_weights import check_pretrained, read_init_weights
from selfsup.image.runs import export_encoder

STATS_SAMPLES = 10_000


@rundir.releases_run_locks
def pretrain(
    config: PretrainConfig | None = None,
    *,
    command: str | None = None,
    **options: Any,
) -> Path:
    """Pretrain a self-supervised encoder; returns the run directory.

    `selfsup.pretrain(method="simclr", data="digits", epochs=5)` is the same as
    `selfsup pretrain simclr --data digits --epochs 5`. `command` is recorded in
    RUN/command.txt (the CLI passes its command line; by default the equivalent Python call).
    `resume=RUN` continues RUN from its last checkpoint with RUN's own options (the method may
    be omitted; only `epochs` and the engine's options may change).

    Every option, the device, the data and the run directory are checked before anything is
    written; a run that fails before its first checkpoint leaves no folder behind.
    """
    shared, own = split_options(options)
    config = dataclasses.replace(config or PretrainConfig(), **shared)
    if own:  # the method's own options, by name: `pretrain(method="mae", mask_ratio=0.5)`
        config = dataclasses.replace(config, options={**config.options, **own})
    command = command or _python_call(config)
    folder, resume_step, state = None, None, None
    if config.resume:
        folder = rundir.RunFolder.claim(config.resume, resume=True, early=EARLY_RUN_FILES)
        config, state = _resume_config(config, folder)
        resume_step = metrics_log.resumed_step(state)
    elif config.method is None:
        config = dataclasses.replace(config, method=DEFAULT_METHOD)
    if config.method not in METHODS:
        known = ", ".join(METHODS)
        raise SelfsupError(f"method {config.method!r} is unknown; expected one of {known}")
    method_class = get_method(config.method)
    config = method_class.with_defaults(config)
    method_options = METHODS.build(config.method, config.options)
    _check_names(config)
    check_accelerator(config.accelerator)
    check_devices(config.accelerator, config.devices)  # before Lightning starts the processes
    if config.sync_batchnorm and not uses_cuda(config.accelerator):
        raise SelfsupError(
            "--sync-batchnorm needs CUDA GPUs (torch's SyncBatchNorm runs on CUDA only)"
        )
    run = _run_dir(config)
    # checked and locked before the (possibly slow) data loading; written only once every
    # input has been checked
    folder = folder or rundir.RunFolder.claim(run, resume=False, early=EARLY_RUN_FILES)

    decoding = " (decoding and resizing its images)" if config.data.startswith("folder:") else ""
    with SlowPhase(f"loading --data {config.data}{decoding}") as phase:
        train, test, data_extra = method_class.load_data(config, method_options)
        h, w = train.image_size
        phase.done(f"loaded {len(train)} training images of {h}×{w} px")
    if len(train) < step_batch(config):
        accumulate = f" x --accumulate {config.accumulate}" if config.accumulate > 1 else ""
        raise SelfsupError(
            f"--data {config.data} has {len(train)} training images, fewer than one batch "
            f"(--batch-size {config.batch_size}{accumulate}); lower --batch-size"
        )
    config = dataclasses.replace(config, out=str(run))
    seed_everything(config.seed)
    info = _data_info(config, train, test)
    info["encoder"].update(method_class.encoder_spec(config, method_options, train))
    method = method_class(config, info, method_options, **data_extra)
    if state is not None:
        _check_checkpoint_fits(method, str(folder.last), state["state_dict"])
        state = None  # Lightning reads the file again itself
    hint = ResumeHint(run, f"selfsup pretrain --resume {run}")
    trainer = _trainer(config, run, train, resume_step, hint)
    loaders = _loaders(config, train, test)
    checkpoint = str(folder.last) if folder.resumed else None
    with folder.training(hint):  # the processes a multi-device run launches share its folder
        folder.begin(method.run_config(), command)
        os.environ[rundir.RUN_ENV] = str(run)  # inherited by the processes Lightning launches
        began = time.perf_counter()
        trainer.fit(method, *loaders, ckpt_path=checkpoint, weights_only=True)
    steps = trainer.global_step - (resume_step or 0)  # --batch-size is per process
    images = steps * step_batch(config) * trainer.world_size
    folder.finished(time.perf_counter() - began, images, str(trainer.strategy.root_device))
    return run


DEFAULT_METHOD = "simclr"
# Options a resumed run may change: the length of training and how the engine runs it.
RESUMABLE_CHANGES = ("epochs", "accelerator", "devices", "num_workers", "data_dir", "download")


def _resume_config(
    config: PretrainConfig, folder: rundir.RunFolder
) -> tuple[PretrainConfig, dict[str, Any]]:
    """(the run's own config with the allowed changes, its loaded last checkpoint), after
    checking that it loads and that no other option was changed."""
    run = folder.path
    saved = rundir.read_config(run)
    resumed = config_from_saved(saved)
    if config.method is not None and config.method != resumed.method:
        raise SelfsupError(
            f"--resume {run}: that run trains {resumed.method}, not {config.method}; "
            f"omit the method (selfsup pretrain --resume {run})"
        )
    defaults = PretrainConfig()
    for f in dataclasses.fields(PretrainConfig):
        if f.name in (*RESUMABLE_CHANGES, "method", "resume", "out", "options"):
            continue
        given, own = getattr(config, f.name), getattr(resumed, f.name)
        if given != getattr(defaults, f.name) and given != own:
            flag = "--" + f.name.replace("_", "-")
            raise SelfsupError(
                f"--resume {run}: {flag} {given} differs from the run's {own}; a resumed run "
                f"keeps its options (only {', '.join(RESUMABLE_CHANGES)} may change)"
            )
    for name, given in config.options.items():
        own = resumed.options.get(name)
        if given != own:
            raise SelfsupError(
                f"--resume {run}: --{name.replace('_', '-')} {given} differs from the run's "
                f"{own}; a resumed run keeps its options"
            )
    changes = {name: getattr(config, name) for name in RESUMABLE_CHANGES}
    changes = {k: v for k, v in changes.items() if v != getattr(defaults, k)}
    state = folder.load_checkpoint()  # damaged or pickled: one line, before any write
    resumed = dataclasses.replace(resumed, **changes, out=str(run), resume=None)
    return resumed, state


def _check_checkpoint_fits(method: Method, checkpoint: str, state: dict[str, Any]) -> None:
    try:
        method.load_state_dict(state)  # what fit() does first; here the error is one line
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise SelfsupError(
            f"{checkpoint}: does not fit the run's {method.config.method} model ({first})"
        ) from None


def _python_call(config: PretrainConfig) -> str:
    changed = [
        f"{f.name}={getattr(config, f.name)!r}"
        for f in dataclasses.fields(config)
        if f.name != "options" and getattr(config, f.name) != f.default
    ]
    changed += [f"{name}={value!r}" for name, value in config.options.items()]
    return f"selfsup.pretrain({', '.join(changed)})"


def _check_names(config: PretrainConfig) -> None:
    check_backbone(config.backbone)  # type: ignore[arg-type]  # the method's default filled in
    if config.init_weights:  # missing or damaged: one line before the run folder is claimed
        read_init_weights(config.init_weights)
    elif config.init_weights_partial:
        raise SelfsupError("--init-weights-partial needs --init-weights FILE")
    if config.pretrained:
        check_pretrained(config.backbone, config.init_weights)  # type: ignore[arg-type]
    for option, value, valid in [
        ("--optimizer", config.optimizer, OPTIMIZERS),
        ("--recipe", config.recipe, RECIPES),
    ]:
        if value not in valid:
            raise SelfsupError(f"{option} {value!r} is unknown; expected one of {', '.join(valid)}")


def _data_info(config: PretrainConfig, train: ImageData, test: ImageData | None) -> dict[str, Any]:
    """Shapes, pixel type, classes and per-channel statistics: what the encoder needs to be
    rebuilt and fed later."""
    g = torch.Generator().manual_seed(config.seed)
    picked = torch.randperm(len(train), generator=g)[:STATS_SAMPLES].sort().values
    images = train.images(picked)
    mean, std = channel_stats(images)  # uint8 or float [0, 1], any channels
    h, w = train.image_size
    small = config.small_images if config.small_images is not None else max(h, w) <= 64
    return {
        "dataset": {
            "channels": train.channels,
            "image_size": [h, w],
            "pixels": data_pixels(config.data, config.data_dir, images.dtype),
            "num_classes": len(train.classes) if train.classes and train.has_labels else 0,
            "classes": list(train.classes) if train.classes else None,
            "train_size": len(train),
            "test_split": None
            if test is None
            else f"held out: a stratified {HOLDOUT:.0%} of the labeled images, never pretrained on"
            if test.held_out
            else "the source's own",
        },
        "encoder": {
            "backbone": config.backbone,
            "in_channels": train.channels,
            "small_images": small,
            "mean": mean,
            "std": std,
            **backbone_size(config.backbone, [h, w]),  # timm/torchvision ViTs are built for it
        },
    }


def _run_dir(config: PretrainConfig) -> Path:
    if config.out:
        return Path(config.out)
    if not rundir.is_first_process():
        if rundir.RUN_ENV in os.environ:  # launched by the first process (Lightning devices>1)
            return Path(os.environ[rundir.RUN_ENV])
        raise SelfsupError(
            "several processes were started (torchrun, SLURM): pass --out so that they share "
            "one run directory"
        )
    return rundir.default_run_dir(config.method, config.data)


# What image pretraining writes before its first checkpoint, beside config, command, metrics.
EARLY_RUN_FILES = {"samples", "tensorboard"}


def step_batch(config: PretrainConfig) -> int:
    """The images of one optimiser step in one process: --accumulate micro-batches, which the
    method splits a loader batch into (so that epochs, steps and checkpoints count steps)."""
    return config.batch_size * config.accumulate


def _loaders(config: PretrainConfig, train: ImageData, test: ImageData | None) -> list:
    loaders = [
        batch_loader(
            train,
            step_batch(config),
            shuffle=True,
            drop_last=True,
            seed=config.seed,
            num_workers=config.num_workers,
        )
    ]
    if config.online_probe and test is not None and test.has_labels:
        if config.limit is not None and len(test) > config.limit:  # small tries stay small
            test = test.subset(stratified_indices(test.y, config.limit, seed=None))
        loaders.append(
            batch_loader(
                test,
                config.batch_size,
                shuffle=False,
                drop_last=False,
                num_workers=config.num_workers,
            )
        )
    return loaders


def _trainer(
    config: PretrainConfig,
    run: Path,
    train: ImageData,
    resume_step: int | None,
    hint: ResumeHint,
) -> L.Trainer:
    """The engine's Trainer with what image pretraining adds: epochs, the latest epoch's
    checkpoint beside last.ckpt, TensorBoard, the encoder and samples after every epoch."""
    progress = show_bars(config.progress)
    return build_trainer(
        run,
        config,
        hint=hint,
        processes="relaunch",  # the processes re-run the command and find the run in RUN_ENV
        checkpoint=dict(filename="epoch{epoch:03d}", auto_insert_metric_name=False, save_top_k=1),
        callbacks=[
            ExportEncoder(run),
            SaveSamples(run),
            *([] if progress else [EpochLines()]),
            ProgressLines(step_batch(config), train.image_size, periodic=not progress),
        ],
        keep_before=resume_step,
        tensorboard=True,
        bar=dict(leave=True),
        max_epochs=config.epochs,
        log_every_n_steps=max(1, min(50, len(train) // step_batch(config))),
        sync_batchnorm=config.sync_batchnorm,
    )


class ExportEncoder(Callback):
    """Writes RUN/encoder.safetensors after every training epoch."""

    def __init__(self, run: Path) -> None:
        self.path = run / rundir.ENCODER

    def on_train_epoch_end(self, trainer: L.Trainer, method: Method) -> None:
        if trainer.is_global_zero:
            export_encoder(method.encoder, self.path)


class SaveSamples(Callback):
    """Draws RUN/samples/epochNNN.png after every epoch with the method's `save_samples`."""

    def __init__(self, run: Path, count: int = 8) -> None:
        self.folder, self.count = run / "samples", count
        self.images: torch.Tensor | None = None  # the same images every epoch, fetched once

    def on_train_epoch_end(self, trainer: L.Trainer, method: Method) -> None:
        if not trainer.is_global_zero:
            return
        if self.images is None:
            self.images = next(iter(trainer.train_dataloader))[0][: self.count]
        x = self.images
        self.folder.mkdir(parents=True, exist_ok=True)
        was_training = method.training
        method.eval()
        method.save_samples(
            x.to(method.device), self.folder / f"epoch{trainer.current_epoch:03d}.png"
        )
        method.train(was_training)


def say(line: str) -> None:
    """A line on stderr that leaves any progress bar intact (tqdm redraws it below)."""
    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


class SlowPhase:
    """Says what a phase is doing on stderr once it has run `after` seconds (quick phases stay
    silent), and with `done(what)` how long it took."""

    after = 2.0

    def __init__(self, doing: str) -> None:
        self.doing, self.said = doing, False
        self.timer = threading.Timer(self.after, self._say)
        self.timer.daemon = True

    def _say(self) -> None:
        self.said = True
        if rundir.is_first_process():
            say(f"{self.doing} ...")

    def __enter__(self) -> SlowPhase:
        self.began = time.perf_counter()
        self.timer.start()
        return self

    def done(self, what: str) -> None:
        self.timer.cancel()
        self.timer.join()
        if self.said and rundir.is_first_process():
            say(f"{what} in {duration(time.perf_counter() - self.began)}")

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()


# The side a CPU trains in minutes: ~10x the images/s of 224 px (ConvNet simclr, 2 threads).
CPU_IMAGE_SIZE = 96


class ProgressLines(Callback):
    """Lines on stderr: after the first step, its images/s and the ETA of the whole run (with,
    on a CPU, what a smaller --image-size would take); then, off a terminal (where the progress
    bar shows the same), images/s and the ETA every `every` seconds."""

    every = 60.0

    def __init__(self, batch_size: int, image_size: tuple[int, int], *, periodic: bool) -> None:
        self.batch_size, self.image_size, self.periodic = batch_size, image_size, periodic

    def on_train_start(self, trainer: L.Trainer, method: Method) -> None:
        self.began = self.last = time.perf_counter()
        self.steps, self.epoch0 = 0, trainer.current_epoch

    def on_train_batch_end(self, trainer: L.Trainer, method: Method, *args: Any) -> None:
        if not trainer.is_global_zero:
            return
        self.steps += 1
        now = time.perf_counter()
        if self.steps > 1 and not (self.periodic and now - self.last >= self.every):
            return
        self.last = now
        per_epoch = trainer.num_training_batches
        total = per_epoch * (trainer.max_epochs - self.epoch0)
        seconds = (now - self.began) / self.steps  # per step, all overheads included
        rate = self.batch_size * trainer.world_size / seconds
        eta = seconds * (total - self.steps)
        epoch = f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        line = f"{epoch}  step {self.steps}/{total}  {rate:.0f} images/s  ETA {duration(eta)}"
        if self.steps == 1:
            h, w = self.image_size
            device = trainer.strategy.root_device.type
            line += f" (about {duration(seconds * per_epoch)} per epoch at {h}×{w} px on {device}"
            if device == "cpu" and h * w >= 2 * CPU_IMAGE_SIZE**2:  # at least twice as fast
                smaller = seconds * total * CPU_IMAGE_SIZE**2 / (h * w)
                line += f"; --image-size {CPU_IMAGE_SIZE} would take about {duration(smaller)}"
            line += ")"
        say(line)


class EpochLines(Callback):
    """Instead of progress bars (logs that are not a terminal): one line per finished epoch."""

    def on_train_epoch_start(self, trainer: L.Trainer, method: Method) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, method: Method) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        if "test/probe_acc" in metrics:
            parts.append(f"online probe {100 * float(metrics['test/probe_acc']):.1f}%")
        parts.append(f"{time.perf_counter() - self.start:.1f} s")
        print("  ".join(parts), flush=True)


def run_summary(run: Path) -> str:
    """What a finished `selfsup pretrain` prints: what was trained, where it went, what next."""
    config = rundir.read_config(run)
    last: dict[str, str] = {}
    metrics = run / metrics_log.METRICS
    if metrics.is_file():
        with open(metrics, newline="") as f:
            for row in csv.DictReader(f):
                last.update({k: v for k, v in row.items() if v})
    epochs = int(last["epoch"]) + 1 if "epoch" in last else 0
    lines = [
        f"pretrained {config['method']} on {config['data']}: {epochs} epoch(s) of "
        f"{config['dataset']['train_size']} images"
    ]
    if "train/loss" in last:
        probe = last.get("test/probe_acc")
        lines.append(
            f"final loss {float(last['train/loss']):.4f}"
            + (
                f"; online linear probe {100 * float(probe):.1f}% on the test split"
                if probe
                else ""
            )
        )
    lines.append(f"run: {run}/ (config.yaml, checkpoints/, encoder.safetensors, metrics.csv)")
    if (run / "report.html").is_file():
        lines.append(f"report: {run / 'report.html'}")
    lines.append(f"next: {next_command(config, run)}")
    return "\n".join(lines)


def next_command(config: dict[str, Any], run: Path) -> str:
    """What to run after pretraining: evaluation on the run's data if it has labels, else on a
    labeled folder (or what to label first)."""
    if config["dataset"].get("num_classes"):
        return f"selfsup evaluate {run}"
    return (
        f"selfsup evaluate {run} --data folder:LABELED (a folder with class sub-folders: "
        f"the run's data has no labels), or selfsup select {run} --budget 50 (which to label)"
    )


def config_from_saved(saved: dict[str, Any]) -> PretrainConfig:
    """The PretrainConfig of a run's flat config.yaml: the shared options, and the method's own
    (an older run's file also holds every other method's options, which are dropped)."""
    shared = {f.name for f in dataclasses.fields(PretrainConfig)} - {"options"}
    method = saved.get("method") or "simclr"
    own = METHODS.option_names(method)
    # a run's weights are in its checkpoints: --init-weights and --pretrained (kept in
    # config.yaml for the record) are not loaded again by --resume or by rebuilding the method
    shared -= {"init_weights", "init_weights_partial", "pretrained"}
    return PretrainConfig(
        **{k: v for k, v in saved.items() if k in shared},
        options={k: v for k, v in saved.items() if k in own},
    )
