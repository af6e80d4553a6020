"""`--devices N` on the stages after pretraining: two CPU processes (gloo, forked by the stage)
end with the weights of one process that trains on the whole batch (SFT, with LoRA too, DPO and
KTO, with batches whose shares differ in rows and tokens; KTO's reference point is the whole
batch's KL estimate, and a batch of one row leaves one process an empty share), and GRPO's and
PPO's two processes, each sampling its share of the prompts, end where one process does when
every prompt's answers are sampled with a seed of their own (PPO: advantages whitened and token
means taken over the whole batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import selfsup

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = {"accelerator": "cpu", "progress": False, "report": False}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama (no dropout, whose masks would differ between processes; no attention
    biases, whose key bias has no gradient but rounding noise that AdamW would blow up into
    steps), a character tokenizer, conversations whose answers differ in length, and
    preference pairs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfsup.core.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("devices")
    tokenizer = train_tokenizer(["0123456789 abcdefghijklmnopqrstuvwxyz?."], kind="char")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    sft = [{"prompt": f"what is {i} plus {i}?", "completion": f"it is {2 * i}."} for i in range(21)]
    pairs = [
        {"prompt": f"what is {i} plus {i}?", "chosen": f"it is {2 * i}.", "rejected": f"{i}."}
        for i in range(13)
    ]
    unpaired = [
        {"prompt": f"what is {i} plus {i}?", "completion": f"it is {2 * i + i % 3 // 2}.",
         "label": i % 3 != 2}
        for i in range(14)
    ]  # fmt: skip
    files = (("sft.jsonl", sft), ("pairs.jsonl", pairs), ("unpaired.jsonl", unpaired))
    for name, lines in files:
        (root / name).write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root


def _weights(run: Path) -> dict[str, torch.Tensor]:
    files = [run / "hf" / name for name in ("model.safetensors", "adapter_model.safetensors")]
    return load_file(str(next(f for f in files if f.is_file())))


def _assert_same(one: Path, two: Path) -> None:
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    metrics = [(r / "metrics.csv").read_text().splitlines() for r in (one, two)]
    assert metrics[0][0] == metrics[1][0] and len(metrics[0]) == len(metrics[1])
    for row_a, row_b in zip(metrics[0][1:], metrics[1][1:], strict=True):  # whole-batch means
        for x, y in zip(row_a.split(","), row_b.split(","), strict=True):
            assert float(y) == pytest.approx(float(x), abs=1e-5)


def _sft(base: Path, out: Path, devices: str, **options) -> Path:
    return selfsup.align(
        "sft", init=str(base / "base"), data=str(base / "sft.jsonl"), out=str(out),
        devices=devices, batch_size=8, epochs=2, lr=1e-2, max_length=48, val_fraction=0.15,
        **CPU, **options,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sft_one(base, tmp_path_factory) -> Path:
    """SFT on one process: the reference of the SFT tests and the policy the others start from
    (they only read it)."""
    return _sft(base, tmp_path_factory.mktemp("sft") / "one", "1")


def test_sft_on_two_processes_ends_as_one_process(base, sft_one, tmp_path):
    # 18 training conversations in batches of 8, 8, 2: shares of 4 rows with different token
    # counts, then of 1 row each; the validation's 3 split 2 + 1
    one, two = sft_one, _sft(base, tmp_path / "two", "2")
    _assert_same(one, two)
    start, end = load_file(str(base / "base" / "model.safetensors")), _weights(one)
    assert (end["model.norm.weight"] - start["model.norm.weight"]).abs().max() > 1e-3  # trained


def test_sft_with_lora_on_two_processes_ends_as_one_process(base, tmp_path):
    one = _sft(base, tmp_path / "one", "1", lora_r=2, lora_dropout=0.0)
    two = _sft(base, tmp_path / "two", "2", lora_r=2, lora_dropout=0.0)
    _assert_same(one, two)


def test_sft_launched_by_torchrun_joins_its_processes_and_ends_as_one_process(
    base, sft_one, tmp_path
):
    # torchrun starts both processes: the stage must join them (ddp), not fork two more each
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "selfsup", "lm", "sft", "--init", str(base / "base")]
    command += ["--data", str(base / "sft.jsonl"), "--out", str(tmp_path / "two"), "--devices", "2"]
    command += ["--batch-size", "8", "--epochs", "2", "--lr", "1e-2", "--max-length", "48"]
    command += ["--val-fraction", "0.15", "--accelerator", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELFSUP_REPORT": "0"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("Initializing distributed") == 2  # two processes, not four
    assert done.stdout.count("run directory:") == 1  # the summary once, from the first
    _assert_same(sft_one, tmp_path / "two")


def test_dpo_on_two_processes_ends_as_one_process(base, sft_one, tmp_path):
    runs = [
        selfsup.align(
            "dpo",
            init=str(sft_one),
            data=str(base / "pairs.jsonl"),
            out=str(tmp_path / devices),
            devices=devices,
            batch_size=5,
            epochs=2,
            lr=1e-2,
            beta=0.5,
            val_fraction=0.25,
            **CPU,
        )  # fmt: skip
        for devices in ("1", "2")
    ]
    _assert_same(*runs)  # 10 training pairs in batches of 5: shares of 3 and 2


def test_kto_on_two_processes_ends_as_one_process(base, sft_one, tmp_path):
    runs = [
        selfsup.align(
            "kto",
            init=str(sft_one),
            data=str(base / "unpaired.jsonl"),
            out=str(tmp_path / devices),
            devices=devices,
            batch_size=5,
            epochs=2,
            lr=1e-2,
            beta=0.5,
            val_fraction=0.2,
            **CPU,
        )  # fmt: skip
        for devices in ("1", "2")
    ]
    # 11 training answers in batches of 5, 5, 1 (shares of 2 and 3, then none and 1), 3 to
    # validate (1 and 2): z0 from both shares' mismatched pairs, an answer crossing the shares
    _assert_same(*runs)
    header, *rows = (Path(runs[0]) / "metrics.csv").read_text().splitlines()
    kl = [float(r.split(",")[header.split(",").index("val_kl")]) for r in rows]
    assert kl[-1] > 1e-3  # the reference point is not clamped to 0: it counts


def _per_group_sampler(sample):
    """`rollout.sample` answering each prompt's group with a seed of its own (the prompt's text
    and the iteration's seed), so that which process samples a group does not change it."""
    from selfsup.lm.alignment.rollout import Rollout

    def sampled(model, tokenizer, conversations, new, temperature, top_k, seed):
        starts = [i for i, c in enumerate(conversations) if i == 0 or c != conversations[i - 1]]
        parts = [
            sample(model, tokenizer, conversations[a:b], new, temperature, top_k,
                   seed * 1000 + sum(map(ord, conversations[a][-1]["content"])))
            for a, b in zip(starts, [*starts[1:], len(conversations)], strict=True)
        ]  # fmt: skip
        p = max(r.prompt_length for r in parts)
        t = max(r.responses.shape[1] for r in parts)
        pad = tokenizer.pad_token_id

        def padded(x, r, value, answer_only=False):  # prompts left-padded, answers right-padded
            left = p - r.prompt_length if not answer_only else 0
            right = t - r.responses.shape[1]
            return torch.nn.functional.pad(x, (left, right), value=value)

        return Rollout(
            torch.cat([padded(r.sequences, r, pad) for r in parts]),
            torch.cat([padded(r.attention_mask, r, 0) for r in parts]),
            p,
            torch.cat([padded(r.response_mask, r, 0, answer_only=True) for r in parts]),
            torch.cat([r.ended for r in parts]),
            parts[0].suppressed,
            parts[0].temperature,
        )

    return sampled


def _online_inputs(sft: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(SFT run, a reward model from it with a random head, six prompts) for GRPO and PPO."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    reward = AutoModelForSequenceClassification.from_pretrained(str(sft / "hf"), num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(str(sft / "hf"))
    # the score at the last token that is not padding: the tokenizer's pad, so that how far a
    # share's answers are padded does not move it
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(tmp_path / "reward")
    tokenizer.save_pretrained(tmp_path / "reward")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {i} plus 1?"}) + "\n"
                               for i in range(6)))  # fmt: skip
    return sft, tmp_path / "reward", prompts


def _assert_same_online(runs: list, first_rows: int) -> list[list[str]]:
    """The two runs' weights equal (1e-5), the first iteration's logged means (1e-4); the
    metrics rows, header first."""
    a, b = (load_file(str(Path(r) / "hf" / "model.safetensors")) for r in runs)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    rows = [(Path(r) / "metrics.csv").read_text().splitlines() for r in runs]
    assert rows[0][0] == rows[1][0]
    for line in range(1, first_rows + 1):
        for x, y in zip(rows[0][line].split(","), rows[1][line].split(","), strict=True):
            assert float(y) == pytest.approx(float(x), abs=1e-4)
    return [r.split(",") for r in rows[0]]


def _online_runs(stage: str, sft_one, tmp_path, **settings) -> list:
    """`stage` (grpo or rlhf) on one process and on two, from the same inputs and settings."""
    sft, reward, prompts = _online_inputs(sft_one, tmp_path)
    common = dict(policy=str(sft), reward=str(reward), prompts=str(prompts), iterations=2,
                  lr=1e-2, max_new_tokens=6, eval_samples=2, eval_every=2, **CPU)  # fmt: skip
    return [
        selfsup.align(stage, out=str(tmp_path / devices), devices=devices, **common, **settings)
        for devices in ("1", "2")
    ]


def test_grpo_on_two_processes_ends_as_one_process(sft_one, tmp_path, monkeypatch):
    from selfsup.lm.alignment import grpo

    monkeypatch.setattr(grpo, "sample", _per_group_sampler(grpo.sample))
    runs = _online_runs(
        "grpo", sft_one, tmp_path, prompts_per_iteration=4, group_size=3, minibatch=12
    )
    _assert_same_online(runs, 1)


def test_ppo_on_two_processes_ends_as_one_process(sft_one, tmp_path, monkeypatch):
    from selfsup.lm.alignment import ppo

    monkeypatch.setattr(ppo, "sample", _per_group_sampler(ppo.sample))
    # one minibatch of the whole batch an epoch: its shares of 2 answers each
    runs = _online_runs("rlhf", sft_one, tmp_path, rollouts=4, minibatch=4, ppo_epochs=2)
    rows = _assert_same_online(runs, 2)
    tokens = [float(r[rows[0].index("answer_tokens")]) for r in rows[1:]]
    assert any(t < 6 for t in tokens)  # answers of unequal length: shares of unequal tokens
