"""Nothing on stderr but what selfsup says: no tracing warnings on export, no transformers
loading bars, no Lightning resume warnings, and `--progress` bars on stderr, never stdout."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from selfsup.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_export_traces_without_tracer_or_deprecation_warnings(digits_run: Path, tmp_path) -> None:
    from selfsup.image.use.export import export, quiet_tracing

    formats = ["torchscript"] + (["onnx"] if importlib.util.find_spec("onnxruntime") else [])
    for format in formats:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export(digits_run, format, tmp_path / f"encoder.{format}")
        kinds = [(w.category.__name__, str(w.message)[:60]) for w in caught]
        assert not [k for k in kinds if k[0] == "TracerWarning" or "jit.trace" in k[1]], kinds
    with warnings.catch_warnings(record=True) as caught:  # only those: any other still shows
        warnings.simplefilter("always")
        with quiet_tracing():
            warnings.warn("something else", FutureWarning, stacklevel=1)
            warnings.warn("a trace", torch.jit.TracerWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]


def test_loading_a_transformers_model_draws_no_bars(tmp_path: Path, capfd) -> None:
    from transformers import BertConfig, BertForPreTraining
    from transformers.utils import logging as hf_logging

    from selfsup.lm.models.bert import load_init

    size = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    BertForPreTraining(BertConfig(vocab_size=50, **size)).save_pretrained(tmp_path / "bert")
    hf_logging.enable_progress_bar()  # as in a fresh process
    hf_logging.set_verbosity_warning()
    capfd.readouterr()
    assert load_init(str(tmp_path / "bert")).vocab_size == 50
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err and "it/s" not in captured.err
    assert captured.out == ""


def test_progress_bars_go_to_stderr_and_resume_warns_of_nothing(
    tmp_path: Path, capfd, monkeypatch, recwarn
) -> None:
    monkeypatch.setenv("SELFSUP_REPORT", "0")
    run = tmp_path / "run"
    argv = ["pretrain", "simclr", "--data", "digits", "--limit", "128", "--batch-size", "64"]
    argv += ["--epochs", "1", "--out", str(run), "--no-online-probe", "--progress"]
    assert main(argv) == 0
    captured = capfd.readouterr()
    assert "Epoch 0" in captured.err and "it/s" in captured.err  # Lightning's bar ...
    assert "it/s" not in captured.out and "pretrained simclr" in captured.out  # ... not here
    recwarn.clear()
    assert main(["pretrain", "--resume", str(run), "--epochs", "2"]) == 0
    assert "final loss" in capfd.readouterr().out
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "exists and is not empty" in m], messages
