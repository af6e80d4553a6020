"""The one Lightning Trainer of every training run (image pretraining, GPT/BERT, word2vec).

It settles what every run shares: accelerator, devices, precision and strategy;
RUN/checkpoints/last.ckpt (Lightning writes it atomically: a temporary file, then a rename);
RUN/metrics.csv kept across `--resume` and flushed with every checkpoint; progress bars on
stderr; the Ctrl-C hint. A caller passes what differs: its callbacks, the checkpoint's other
file, and Lightning's loop options (max_epochs or max_steps, val_check_interval,
gradient_clip_val, log_every_n_steps, ...). It knows neither images nor text.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from selfsup.core import run as rundir
from selfsup.core.errors import SelfsupError
from selfsup.engine import metrics_log
from selfsup.engine.device import check_accelerator, uses_cuda
from selfsup.engine.distributed import check_devices
from selfsup.engine.progress import StderrProgressBar, show_bars

# How further processes start: "one" (a run in one process), "fork" (forked once the run is
# prepared; CUDA is not touched before the fork) or "relaunch" (Lightning re-runs the command).
Processes = Literal["one", "fork", "relaunch"]


class EngineOptions(Protocol):
    """The options of every training command that the engine reads (`--accelerator`,
    `--devices`, `--precision`, `--progress/--no-progress`)."""

    accelerator: str
    devices: str
    precision: str | None
    progress: bool | None


QUIET = (  # Lightning's advice that does not apply to selfsup runs
    ".*does not have many workers.*",
    ".*LeafSpec.*",
    ".*Experiment logs directory.*",
    ".*no `val_dataloader`.*",
    "Checkpoint directory .* exists and is not empty",  # a resumed run
)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (call it before building the model: it seeds the init)."""
    L.seed_everything(seed, verbose=False)


def default_precision(accelerator: str) -> str:
    """bf16 mixed precision on CUDA GPUs, full float32 elsewhere."""
    return "bf16-mixed" if uses_cuda(accelerator) else "32-true"


def lightning_devices(devices: str, on_gpu: bool) -> int | str:
    """`--devices` for Lightning: `auto` is every GPU (one process each), else one process; a
    number is that many; anything else (a GPU list, -1) goes to Lightning as given."""
    if devices == "auto":
        if not on_gpu:
            return 1
        from lightning.fabric.accelerators.cuda import num_cuda_devices  # does not start CUDA

        return max(1, num_cuda_devices())
    return int(devices) if devices.isdigit() else devices


def launched_outside() -> bool:
    """True when a launcher started this run's processes (torchrun, SLURM's srun, LSF):
    Lightning then joins them (`ddp`) and must not fork more of its own."""
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    kinds = (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment)
    return any(kind.detect() for kind in kinds)


def many_process_strategy(processes: Processes, count: int | str) -> str:
    """Lightning's strategy: `ddp_fork` when this process forks the others, `ddp` when a
    launcher started them all, `auto` for one process or a run Lightning re-runs."""
    if processes != "fork" or not (isinstance(count, int) and count > 1):
        return "auto"
    return "ddp" if launched_outside() else "ddp_fork"


class ResumeHint(Callback):
    """Notes a Ctrl-C, which Lightning turns into sys.exit(1) after its callbacks ran; the caller
    catches that SystemExit and raises `interruption(...)` instead: the last checkpoint and
    `resume`, the command that continues the run (the CLI ends a KeyboardInterrupt with 130)."""

    def __init__(self, run: Path, resume: str) -> None:
        self.run, self.resume, self.interrupted = run, resume, False

    def on_exception(self, trainer: L.Trainer, module: Any, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted = True

    def interruption(self, nothing_kept: str) -> KeyboardInterrupt:
        """The KeyboardInterrupt to raise: how to continue, or `nothing_kept` when the run has no
        checkpoint yet. Ctrl-C interrupts again from here on (Lightning had ignored it)."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        last = rundir.last_checkpoint(self.run)
        if last is None:
            return KeyboardInterrupt(nothing_kept)
        return KeyboardInterrupt(f"the last checkpoint is {last}; continue with: {self.resume}")


def build_trainer(
    run: Path,
    options: EngineOptions,
    *,
    hint: ResumeHint | None,
    processes: Processes = "one",
    checkpoint: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    keep_before: int | None = None,
    csv: Mapping[str, Any] | None = None,
    metrics: bool = True,
    tensorboard: bool = False,
    bar: Mapping[str, Any] | None = None,
    **loop: Any,
) -> L.Trainer:
    """A Lightning Trainer writing into `run`, on `options`' accelerator and devices.

    Precision None: `default_precision`. Progress (`show_bars`): a `StderrProgressBar(**bar)`.
    `checkpoint`: ModelCheckpoint options beside last.ckpt (its other file: `filename`,
    `monitor`, ...; `save_last=False` with `filename="last"`: last.ckpt alone, written once).
    `keep_before`: a resumed run's checkpoint step (metrics.csv keeps the rows before it);
    `csv`: RunCSVLogger options (`drop`, `flush_logs_every_n_steps`); `metrics=False`: no
    RunCSVLogger (the caller writes RUN/metrics.csv itself); `tensorboard`:
    also RUN/tensorboard when tensorboard is installed. `loop`: the rest, for L.Trainer.
    """
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for pattern in QUIET:
        warnings.filterwarnings("ignore", pattern)
    devices, progress = options.devices, show_bars(options.progress)
    check_accelerator(options.accelerator)
    lightning_accelerator = options.accelerator.lower()
    if processes == "one":
        if str(devices) not in ("1", "auto"):
            raise SelfsupError(
                f"--devices {devices}: this run trains in one process on one device (1 or auto)"
            )
        count: int | str = 1
    else:
        check_devices(lightning_accelerator, devices)  # before Lightning starts the processes
        count = lightning_devices(devices, uses_cuda(lightning_accelerator))
    loggers: list[Any] = (
        [metrics_log.RunCSVLogger(run, keep_before=keep_before, **(csv or {}))] if metrics else []
    )
    if tensorboard and importlib.util.find_spec("tensorboard") is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=run, name="tensorboard", version=""))
    every: list[Callback] = [
        ModelCheckpoint(
            dirpath=run / rundir.CHECKPOINTS, **{"save_last": True, **(checkpoint or {})}
        ),
        metrics_log.FlushMetricsWithCheckpoints(),
    ]
    if hint is not None:
        every.append(hint)
    if progress:
        every.append(StderrProgressBar(**(bar or {})))
    return L.Trainer(
        default_root_dir=run,
        accelerator=lightning_accelerator,
        devices=count,
        strategy=many_process_strategy(processes, count),
        precision=options.precision or default_precision(lightning_accelerator),  # type: ignore[arg-type]
        logger=loggers,
        callbacks=[*every, *callbacks],
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **loop,
    )
