"""The one Trainer factory (selfsup.engine.trainer): its choices against stated expectations."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from selfsup.core.errors import SelfsupError
from selfsup.engine import device, trainer
from selfsup.engine.distributed import cpu_cores
from selfsup.engine.metrics_log import FlushMetricsWithCheckpoints, RunCSVLogger
from selfsup.engine.progress import StderrProgressBar
from selfsup.engine.trainer import ResumeHint, build_trainer, lightning_devices

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _build(run: Path, **settings: object) -> L.Trainer:
    """build_trainer on a CPU, `devices` auto, default precision, no progress bar."""
    engine = dict(accelerator="cpu", devices="auto", precision=None, progress=False)
    for name in engine:
        engine[name] = settings.pop(name, engine[name])
    return build_trainer(run, SimpleNamespace(**engine), **{"hint": None, **settings})


def test_a_cpu_run_is_one_process_in_full_float32(tmp_path: Path) -> None:
    t = _build(tmp_path, max_epochs=3)
    assert t.precision == "32-true" and t.num_devices == 1 and t.max_epochs == 3
    assert isinstance(t.strategy, SingleDeviceStrategy) and t.strategy.root_device.type == "cpu"
    assert _build(tmp_path, precision="bf16-mixed").precision == "bf16-mixed"  # as given


def test_bf16_mixed_is_the_default_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [trainer.default_precision(a) for a in ("auto", "gpu", "CUDA", "cpu", "mps")] == [
        "bf16-mixed", "bf16-mixed", "bf16-mixed", "32-true", "32-true"
    ]  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trainer.default_precision("auto") == "32-true"


def test_devices_auto_is_every_gpu_or_one_cpu_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning.fabric.accelerators.cuda as cuda

    monkeypatch.setattr(cuda, "num_cuda_devices", lambda: 4)
    assert lightning_devices("auto", on_gpu=True) == 4
    assert lightning_devices("auto", on_gpu=False) == 1
    assert lightning_devices("3", on_gpu=False) == 3 and lightning_devices("0,1", True) == "0,1"


def test_several_devices_in_a_one_process_run_are_one_line(tmp_path: Path) -> None:
    for devices in ("2", "-1", "0,1"):
        with pytest.raises(SelfsupError, match=f"--devices {devices}: this run trains in one"):
            _build(tmp_path, devices=devices)  # processes="one" is the default
    assert _build(tmp_path, devices="1").num_devices == 1


@pytest.mark.skipif(cpu_cores() < 2, reason="needs two CPU cores")
def test_two_cpu_processes_are_forked_or_relaunched_as_asked(tmp_path: Path) -> None:
    forked = _build(tmp_path, devices="2", processes="fork")
    assert isinstance(forked.strategy, DDPStrategy) and forked.num_devices == 2
    assert forked.strategy._start_method == "fork"
    relaunched = _build(tmp_path, devices="2", processes="relaunch")
    assert relaunched.num_devices == 2 and relaunched.strategy._start_method == "popen"
    with pytest.raises(SelfsupError, match=r"this machine has \d+ CPU core\(s\)"):
        _build(tmp_path, devices=str(cpu_cores() + 1), processes="fork")


@pytest.mark.skipif(cpu_cores() < 2, reason="needs two CPU cores")
def test_processes_a_launcher_started_are_joined_not_forked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torchrun's variables for the first of two processes: Lightning joins it (popen launcher,
    # which starts nothing when the environment made the processes)
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # the Trainer sets it
    torchrun = {"RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                "TORCHELASTIC_RUN_ID": "none"}  # fmt: skip
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    joined = _build(tmp_path, devices="2", processes="fork")
    assert joined.strategy._start_method == "popen" and joined.num_devices == 2
    assert joined.strategy.cluster_environment.creates_processes_externally


def test_accelerators_are_one_list_checked_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from selfsup.lm.models import hf

    assert hf.check_accelerator is device.check_accelerator  # one definition, in the engine
    assert device.ACCELERATORS == ("auto", "cpu", "gpu", "cuda", "mps")
    with pytest.raises(SelfsupError, match="--accelerator 'tpu' is unknown; expected one of auto"):
        device.check_accelerator("tpu")
    device.check_accelerator("CPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SelfsupError, match="--accelerator gpu: no CUDA GPU"):
        device.check_accelerator("gpu")


def test_checkpoints_metrics_and_bars_are_the_engines(tmp_path: Path) -> None:
    hint = ResumeHint(tmp_path, "go on")
    kept = dict(keep_before=12, csv=dict(drop=("epoch",)))
    best = dict(filename="best", monitor="val/loss")
    t = _build(
        tmp_path, hint=hint, progress=True, bar=dict(refresh_rate=7), checkpoint=best, **kept
    )
    ckpt = t.checkpoint_callback
    assert Path(ckpt.dirpath) == tmp_path / "checkpoints" and ckpt.save_last is True
    assert (ckpt.filename, ckpt.monitor) == ("best", "val/loss")
    assert isinstance(t.logger, RunCSVLogger) and Path(t.logger.log_dir) == tmp_path
    assert (t.logger.keep_before, t.logger.drop) == (12, ("epoch",))
    assert hint in t.callbacks and any(
        isinstance(c, FlushMetricsWithCheckpoints) for c in t.callbacks
    )
    assert isinstance(t.progress_bar_callback, StderrProgressBar)
    assert t.progress_bar_callback.refresh_rate == 7
    quiet = _build(tmp_path, max_steps=5, gradient_clip_val=0.5, val_check_interval=2)
    assert quiet.progress_bar_callback is None
    assert (quiet.max_steps, quiet.gradient_clip_val, quiet.val_check_interval) == (5, 0.5, 2)


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.current_epoch == 1:
            raise KeyboardInterrupt
        loss = self.layer(batch).square().mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_ctrl_c_says_the_checkpoint_and_the_given_resume_command(tmp_path: Path) -> None:
    hint = ResumeHint(tmp_path, "selfsup frobnicate --resume THERE")
    t = _build(tmp_path, hint=hint, max_epochs=3, log_every_n_steps=1)
    loader = torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=4)
    with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C, after the callbacks ran
        t.fit(_Tiny(), loader)
    assert hint.interrupted
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what Lightning leaves (before 2.6)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert str(hint.interruption("nothing")) == (
        f"the last checkpoint is {last}; continue with: selfsup frobnicate --resume THERE"
    )
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again
    assert (tmp_path / "metrics.csv").is_file()
    last.unlink()
    assert str(hint.interruption("nothing was kept")) == "nothing was kept"


def test_only_a_keyboard_interrupt_counts_as_ctrl_c(tmp_path: Path) -> None:
    hint = ResumeHint(tmp_path, "x")
    hint.on_exception(None, None, ValueError("no"))  # type: ignore[arg-type]
    assert not hint.interrupted
    hint.on_exception(None, None, KeyboardInterrupt())  # type: ignore[arg-type]
    assert hint.interrupted
