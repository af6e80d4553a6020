"""GPT pretraining: causal mask, a short real run, resume, Hugging Face round-trip, bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.core.tokenizer import train_tokenizer
from selfsup.lm.data.corpus import load_ids, split_ids
from selfsup.lm.models.gpt import GPT, GPTModule, Options, from_hf, load_run, to_hf
from selfsup.lm.training.pretrain import pretrain_lm

SHAKESPEARE = Path(__file__).parents[2] / "shared" / "data" / "text" / "tinyshakespeare.txt"
needs_data = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data is absent")
SMALL = Options(block_size=32, n_layer=2, n_head=2, n_embd=64)
QUICK = dict(
    batch_size=16,
    lr=3e-3,
    warmup_steps=20,
    eval_batches=10,
    final_eval_batches=20,
    progress=False,
)


def test_causal_mask_hides_later_tokens() -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32).eval()
    ids = torch.randint(0, 50, (3, 16))
    changed = ids.clone()
    changed[:, 9:] = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9])
    assert (before[:, 9:] - after[:, 9:]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data is absent")
    out = tmp_path_factory.mktemp("gpt") / "run"
    return pretrain_lm(
        model="gpt", data=str(SHAKESPEARE), steps=200, eval_interval=100, out=str(out),
        options=SMALL, **QUICK,
    )  # fmt: skip


@needs_data
def test_short_run_learns_well_below_unigram_entropy(run: Path) -> None:
    _, val = split_ids(load_ids(run / "tokens.npy"))
    counts = np.bincount(np.asarray(val))
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())  # 3.34 nats on this split
    results = json.loads((run / "results.json").read_text())
    assert results["val_loss"] < unigram_entropy - 0.7, (results, unigram_entropy)
    with open(run / "metrics.csv") as f:
        val_losses = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    assert len(val_losses) == 2 and val_losses[1] < val_losses[0]
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}


@needs_data
def test_hugging_face_auto_classes_generate_the_same_greedy_tokens(run: Path) -> None:
    hf = AutoModelForCausalLM.from_pretrained(str(run / "hf")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run / "hf"))
    prompt = tokenizer("ROMEO:\nWhat", return_tensors="pt")["input_ids"]
    ours, _, _ = load_run(run)
    with torch.no_grad():
        torch.testing.assert_close(hf(prompt).logits, ours(prompt), atol=1e-4, rtol=1e-4)
        theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False)  # to block_size
    assert theirs.tolist() == ours.generate(prompt, 20, temperature=0).tolist()


@pytest.mark.parametrize("activation", ["gelu", "gelu_new"])
def test_both_gelus_survive_the_hugging_face_round_trip(activation: str) -> None:
    torch.manual_seed(0)
    ours = GPT(50, block_size=16, n_layer=2, n_head=2, n_embd=32, activation=activation).eval()
    for weight in ours.parameters():  # large weights: the two GELUs differ visibly
        weight.data.normal_(0, 0.5)
    hf = to_hf(ours)
    assert hf.config.activation_function == activation
    back = from_hf(hf)
    assert back.activation == activation
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(ids), ours(ids))
        other = GPT(50, 16, 2, 2, 32, activation="gelu_new" if activation == "gelu" else "gelu")
        other.load_state_dict(ours.state_dict())
        assert not torch.allclose(other.eval()(ids), ours(ids), atol=1e-6)  # it matters


def test_the_export_keeps_the_configured_dropout(tmp_path: Path) -> None:
    """Stages that train the export further (SFT, reward model) get the pretraining dropout
    back from the saved config, not 0."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = GPT(50, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.25).eval()
    to_hf(ours).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (hf.config.resid_pdrop, hf.config.embd_pdrop, hf.config.attn_pdrop) == (0.25,) * 3
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
        hf.train()
        assert not torch.allclose(hf(ids).logits, hf(ids).logits)  # dropout is on in training


@needs_data
def test_generate_command(run: Path, capsys) -> None:
    args = ["lm", "generate", str(run), "--prompt", "KING:", "--max-new-tokens", "30"]
    assert main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("KING:") and len(greedy) > len("KING:") + 20
    assert main([*args, "--num-samples", "2", "--top-k", "5"]) == 0
    assert capsys.readouterr().out.count("KING:") == 2
    assert main(["lm", "generate", str(run), "--prompt", "Dvořák"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "cannot encode: 'á' 'ř'" in error
    assert main(["lm", "tokenize", str(run), "To be"]) == 0
    assert "5 tokens, 5 characters" in capsys.readouterr().out


@needs_data
def test_init_starts_from_a_hugging_face_checkpoint(run: Path, tmp_path: Path) -> None:
    source = json.loads((run / "results.json").read_text())["final"]["loss"]
    again = pretrain_lm(
        model="gpt", data=str(SHAKESPEARE), init=str(run / "hf"), steps=1, eval_interval=1,
        out=str(tmp_path / "again"), **{**QUICK, "lr": 1e-9},
    )  # fmt: skip
    results = json.loads((again / "results.json").read_text())
    assert abs(results["final"]["loss"] - source) < 1e-3, (results, source)


def test_resume_continues_exactly(tmp_path: Path, monkeypatch) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    tiny = Options(block_size=16, n_layer=1, n_head=2, n_embd=16)
    settings = dict(data=str(corpus), steps=30, eval_interval=10, options=tiny, **QUICK)
    whole = pretrain_lm(model="gpt", out=str(tmp_path / "whole"), **settings)

    loss = GPTModule.loss

    def crash_at_step_15(self, batch):
        if self.training and self.global_step == 15:
            raise RuntimeError("simulated crash")
        return loss(self, batch)

    monkeypatch.setattr(GPTModule, "loss", crash_at_step_15)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain_lm(model="gpt", out=str(tmp_path / "cut"), **settings)
    monkeypatch.setattr(GPTModule, "loss", loss)
    rows_at_crash = _rows(tmp_path / "cut" / "metrics.csv")
    assert max(int(r["step"]) for r in rows_at_crash) > 10  # logged past the checkpoint
    pretrain_lm(model="gpt", resume=str(tmp_path / "cut"), progress=False)  # from step 10
    a = load_file(whole / "hf" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "hf" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)
    # metrics.csv: the same rows as the uninterrupted run (none lost, none doubled)
    straight, resumed = _rows(whole / "metrics.csv"), _rows(tmp_path / "cut" / "metrics.csv")
    assert [(r["step"], sorted(k for k in r if r[k])) for r in straight] == [
        (r["step"], sorted(k for k in r if r[k])) for r in resumed
    ]
    for x, y in zip(straight, resumed, strict=True):
        for key in (k for k in x if x[k] and k != "train_seconds"):
            assert float(x[key]) == pytest.approx(float(y[key]), rel=1e-5, abs=1e-7), key


def _rows(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cli_error(args: list[str], capsys) -> str:
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("selfsup: error: ") and error.count("\n") == 1, error
    return error


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be\n" * 5)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n" * 50)
    out = tmp_path / "runs" / "x"
    pretrain = ["lm", "pretrain", "gpt", "--out", str(out), "--no-progress"]
    assert "--block-size 64" in _cli_error([*pretrain, "--data", str(short)], capsys)
    assert "empty" in _cli_error([*pretrain, "--data", str(empty)], capsys)
    assert "byte 3" in _cli_error([*pretrain, "--data", str(latin)], capsys)
    assert "--n-head" in _cli_error([*pretrain, "--data", str(short), "--n-head", "3"], capsys)
    assert not out.exists() and list((tmp_path / "runs").iterdir()) == []


@needs_data
def test_vocabulary_mismatch_is_one_line(run: Path, tmp_path: Path, capsys) -> None:
    bigger = train_tokenizer(["abcdefghij" * 50], "bpe", vocab_size=300)
    bigger.save_pretrained(str(tmp_path / "tok"))
    args = ["lm", "pretrain", "gpt", "--data", str(SHAKESPEARE), "--init", str(run / "hf")]
    error = _cli_error([*args, "--tokenizer", str(tmp_path / "tok"), "--out", "x"], capsys)
    assert "vocabulary mismatch" in error and not Path("x").exists()
    with pytest.raises(SelfsupError, match="model_type 'gpt2'"):
        (tmp_path / "bert").mkdir()
        (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
        pretrain_lm(model="gpt", data=str(SHAKESPEARE), init=str(tmp_path / "bert"))


def test_two_processes_take_the_same_steps_as_one(tmp_path: Path) -> None:
    """Data parallelism over 2 CPU processes (gloo): each holds half of every batch's rows; the
    averaged gradients equal the whole batch's, so the weights match one process's run.

    Both runs are the `selfsup` command in a fresh interpreter, as a user runs it: forking the
    test process itself, with the thread pools earlier tests started, can deadlock."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    common = ["lm", "pretrain", "gpt", "--data", str(corpus), "--steps", "6"]
    common += ["--eval-interval", "3", "--block-size", "16", "--n-layer", "1", "--n-head", "2"]
    common += ["--n-embd", "16", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "20"]
    common += ["--eval-batches", "10", "--final-eval-batches", "20", "--no-progress"]
    common += ["--accelerator", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    for out, devices in ((one, "1"), (two, "2")):
        done = subprocess.run(
            [sys.executable, "-m", "selfsup", *common, "--devices", devices, "--out", str(out)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    a = load_file(one / "hf" / "model.safetensors")
    b = load_file(two / "hf" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    results = [json.loads((r / "results.json").read_text()) for r in (one, two)]
    assert results[0]["val_loss"] == pytest.approx(results[1]["val_loss"], abs=1e-5)


def test_ctrl_c_exits_130_with_the_command_that_continues(tmp_path: Path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    loss = GPTModule.loss

    def interrupted_at_step_15(self, batch):
        if self.training and self.global_step == 15:
            raise KeyboardInterrupt
        return loss(self, batch)

    monkeypatch.setattr(GPTModule, "loss", interrupted_at_step_15)
    run = tmp_path / "run"
    argv = ["lm", "pretrain", "gpt", "--data", str(corpus), "--steps", "20"]
    argv += ["--eval-interval", "10", "--eval-batches", "2", "--final-eval-batches", "2"]
    argv += ["--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16"]
    argv += ["--batch-size", "4", "--no-progress", "--out", str(run)]
    capsys.readouterr()
    assert main(argv) == 130
    hint = capsys.readouterr().err.strip().splitlines()[-1]
    assert hint.endswith(f"continue with: selfsup lm pretrain gpt --resume {run}"), hint
    monkeypatch.setattr(GPTModule, "loss", loss)
    assert main(hint.split("continue with: selfsup ")[1].split()) == 0
    assert (run / "hf" / "model.safetensors").is_file()


def test_the_defaults_are_nanogpts_baby_gpt_the_baby_preset():
    """`--preset baby` is the defaults (presets are settings over them): nanoGPT's CPU baby GPT
    (benchmarks/gpt_shakespeare.py's reference configuration)."""
    import dataclasses

    from selfsup.lm.options import LMConfig

    baby = dict(
        tokenizer="char", steps=2000, batch_size=12, lr=1e-3, min_lr_fraction=0.1,
        warmup_steps=100, weight_decay=0.1, beta2=0.99, grad_clip=1.0, eval_interval=250,
        eval_batches=20, final_eval_batches=200, block_size=64, n_layer=4, n_head=4, n_embd=128,
        dropout=0.0,
    )  # fmt: skip
    defaults = {**dataclasses.asdict(LMConfig()), **dataclasses.asdict(Options())}
    assert {k: defaults[k] for k in baby} == baby and GPTModule.presets["baby"] == {}
