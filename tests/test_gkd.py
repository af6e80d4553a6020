"""GKD (`selfsup lm distill`): the generalized JSD against a float64 formula written out here and
against TRL's GKDTrainer.generalized_jsd_loss, a student with another tokenizer refused in one
line, and a tiny run that brings a student's answers' distributions closer to the teacher's."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from selfsup.cli.main import main
from selfsup.core.tokenizer import train_tokenizer
from selfsup.lm.alignment import gkd
from selfsup.lm.alignment.sft import sft
from selfsup.lm.data.arithmetic import write_task
from selfsup.lm.data.chat_data import IGNORE, collate, sft_example
from selfsup.lm.data.conversations import conversation_lines
from selfsup.lm.losses.gkd import generalized_jsd
from selfsup.lm.options import TuneConfig

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
ALPHABET = "0123456789 abcdefghijklmnopqrstuvwxyzACLTW?.+=,-"
BETAS = [0.0, 0.2, 0.5, 1.0]  # 0.2: a mixture weight on the wrong side shows (0.5 hides it)


def _logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher logits 3×5×7, and a mask that leaves out each row's prompt (1, 2 and
    4 positions) and the last row's padding."""
    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(3, 5, 7, generator=g, dtype=F64)).requires_grad_()
    teacher = 3 * torch.randn(3, 5, 7, generator=g, dtype=F64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, :1], mask[1, :2], mask[2, :4] = False, False, False
    mask[1, 4] = False
    return student, teacher, mask


def by_hand(student: torch.Tensor, teacher: torch.Tensor, mask, beta: float, t: float):
    """The paper's JSD(β) = β·KL(P||M) + (1-β)·KL(Q||M), M = βP + (1-β)Q (P the teacher's,
    Q the student's softmax at temperature t), its limits the KLs, token by token in float64."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for i in range(student.shape[1]):
            if not mask[b, i]:
                continue
            q = torch.exp(student[b, i] / t)
            q = q / q.sum()
            p = torch.exp(teacher[b, i] / t)
            p = p / p.sum()
            if beta == 0:
                value = (p * torch.log(p / q)).sum()
            elif beta == 1:
                value = (q * torch.log(q / p)).sum()
            else:
                m = beta * p + (1 - beta) * q
                value = (
                    beta * (p * torch.log(p / m)).sum() + (1 - beta) * (q * torch.log(q / m)).sum()
                )
            total, count = total + value, count + 1
    return total / count


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", BETAS)
def test_the_loss_is_the_papers_jsd_in_float64(beta: float, temperature: float) -> None:
    student, teacher, mask = _logits()
    ours = generalized_jsd(student, teacher, mask, beta, temperature)
    theirs = by_hand(student, teacher, mask, beta, temperature)
    (grad,) = torch.autograd.grad(ours, student)
    (their_grad,) = torch.autograd.grad(theirs, student)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10)
    torch.testing.assert_close(grad, their_grad, rtol=1e-8, atol=1e-12)
    assert not grad[~mask].any()  # the prompt's and the padding's positions carry nothing
    if beta not in (0.0, 1.0):  # the mixture is not one of its KL limits
        assert ours.item() != pytest.approx(
            by_hand(student, teacher, mask, 0.0, temperature).item()
        )


def test_the_limits_are_forward_and_reverse_kl() -> None:
    student, teacher, mask = _logits()
    forward = generalized_jsd(student, teacher, mask, 0.0)
    reverse = generalized_jsd(student, teacher, mask, 1.0)
    assert forward.item() == pytest.approx(generalized_jsd(teacher, student, mask, 1.0).item())
    assert forward.item() != pytest.approx(reverse.item())
    near = generalized_jsd(student, teacher, mask, 1e-6) / 1e-6  # JSD(β)/β -> KL(P || Q)
    assert near.item() == pytest.approx(forward.item(), rel=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", BETAS)
def test_the_loss_matches_trls_gkd(beta: float, temperature: float) -> None:
    gkd_trainer = pytest.importorskip("trl.experimental.gkd")
    student, teacher, mask = _logits()
    labels = torch.where(mask, 1, IGNORE)
    theirs = gkd_trainer.GKDTrainer.generalized_jsd_loss(
        student, teacher, labels=labels, beta=beta, temperature=temperature
    )
    ours = generalized_jsd(student, teacher, mask, beta, temperature)
    (grad,) = torch.autograd.grad(ours, student)
    (their_grad,) = torch.autograd.grad(theirs, student)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10)
    torch.testing.assert_close(grad, their_grad, rtol=1e-8, atol=1e-12)


def _gpt2(vocab: int, layers: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=96, n_embd=32, n_layer=layers, n_head=2,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The arithmetic task's conversations, a teacher (2 layers, SFT on them) and a student
    (1 layer, random, no chat markers) with the same character tokenizer."""
    root = tmp_path_factory.mktemp("gkd")
    write_task(root / "data", seed=0, n_sft=96, n_prompts=8, max_operand=20)
    tokenizer = train_tokenizer([ALPHABET], kind="char")
    for name, layers, seed in (("base", 2, 0), ("student", 1, 1)):
        _gpt2(len(tokenizer), layers, seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    config = TuneConfig(
        init=str(root / "base"), data=str(root / "data" / "sft.jsonl"), out=str(root / "teacher"),
        epochs=2, batch_size=8, lr=5e-3, max_length=64, accelerator="cpu",
    )  # fmt: skip
    sft(config)
    return root


def test_a_student_with_another_tokenizer_is_one_line(pair, tmp_path, capsys) -> None:
    tokenizer = train_tokenizer(["0123456789 abcdefghijklmnopqrstuvwxyz?."], kind="char")
    _gpt2(len(tokenizer), 1, 0).save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    code = main(["lm", "distill", "--init", str(tmp_path / "other"), "--teacher",
                 str(pair / "teacher"), "--data", str(pair / "data" / "sft.jsonl"), "--out",
                 str(tmp_path / "out"), "--accelerator", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "have different tokenizers" in err and "the teacher's tokenizer" in err
    assert not (tmp_path / "out").exists()
    assert main(["lm", "distill", "--init", "x", "--data", "y", "--out", "z", "--beta", "2"]) == 2
    assert "--beta must be between 0 and 1" in capsys.readouterr().err


def _held_out_jsd(student_path, pair, val: int) -> float:  # type: ignore[no-untyped-def]
    """The forward KL of the teacher's and the student's next-token distributions on the
    answers of the last `val` conversations (the run's validation share)."""
    torch.manual_seed(0)  # as distill: the student's new embedding rows
    tokenizer, student, teacher = gkd.load_pair(str(student_path), str(pair / "teacher"))
    lines = (pair / "data" / "sft.jsonl").read_text().splitlines()[-val:]
    path = pair / "held_out.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows = [sft_example(tokenizer, c, 64) for _, c in conversation_lines(path)]
    values = []
    for s in range(0, len(rows), 8):  # as the run validates: the mean of its batches' means
        b = collate(rows[s : s + 8], tokenizer.pad_token_id)
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        with torch.no_grad():
            ours, theirs = student.eval()(**inputs).logits, teacher(**inputs).logits
        mask = b["labels"][:, 1:] != IGNORE
        values.append(generalized_jsd(ours[:, :-1], theirs[:, :-1], mask, 0.0).item())
    return sum(values) / len(values)


def test_distillation_brings_the_student_to_the_teacher(pair, monkeypatch, capsys) -> None:
    """Half the batches answered by the student itself (sampled: some, not all), the rest by the
    file: the held-out JSD to the teacher falls well below the untrained student's, and the
    run's val_loss is that JSD (β 0 here: the forward KL)."""
    sampled = []

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        sampled.append(len(args[2]))
        return real(*args, **kwargs)

    real = gkd.sample
    monkeypatch.setattr(gkd, "sample", counted)
    out = pair / "distilled"
    assert main(["lm", "distill", "--init", str(pair / "student"), "--teacher",
                 str(pair / "teacher"), "--data", str(pair / "data" / "sft.jsonl"), "--out",
                 str(out), "--epochs", "3", "--batch-size", "8", "--lr", "5e-3", "--beta", "0",
                 "--lmbda", "0.5", "--max-length", "64", "--val-fraction", "0.25",
                 "--accelerator", "cpu"]) == 0  # fmt: skip
    assert capsys.readouterr().out.splitlines()[-1].startswith("next: selfsup lm chat")
    assert 0 < len(sampled) < 3 * 9  # 72 training conversations: 9 batches an epoch
    before = _held_out_jsd(pair / "student", pair, 24)
    after = _held_out_jsd(out, pair, 24)
    assert after < 0.5 * before, (before, after)
    rows = (out / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert float(last[header.index("val_loss")]) == pytest.approx(after, rel=1e-4)
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["n_layer"] == 1  # RUN/hf is the student alone
