"""Every language stage knows its model's context: over-long lines are one line naming them
(or cut with --truncate), sizes default to what fits, Ctrl-C says how to resume (issue 34)."""

import json
import shlex
from pathlib import Path

import pytest

from selfsup.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 64
LONG = "a" * 100  # 100 characters: beyond a 64-token character-level model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A 64-position GPT-2 base (character tokenizer), a chat model and a reward model from it,
    and data files whose third line / second prompt is longer than the context."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from selfsup.core.tokenizer import train_tokenizer
    from selfsup.lm.data.chat_data import add_chat_tokens

    root = tmp_path_factory.mktemp("context")
    tokenizer = train_tokenizer(["0123456789 abcdefghijklmnopqrstuvwxyz?.=\n"], kind="char")

    def config(vocab: int) -> GPT2Config:
        return GPT2Config(vocab_size=vocab, n_positions=CONTEXT, n_embd=16, n_layer=1, n_head=2,
                          bos_token_id=0, eos_token_id=0, num_labels=1)  # fmt: skip

    GPT2LMHeadModel(config(len(tokenizer))).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    add_chat_tokens(tokenizer)
    for name, cls in (("chat", GPT2LMHeadModel), ("rm", GPT2ForSequenceClassification)):
        model = cls(config(len(tokenizer)))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    sft = [{"prompt": p, "completion": "ok"} for p in ("hi", "yo", LONG, "x", "y", "z")]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    prompts = [{"prompt": p} for p in ("hi", LONG, "yo")]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return root


def _error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # below transformers' load bars
    assert err.startswith("selfsup: error: "), err
    return err


def test_context_length_of_our_gpt_and_of_hf_configs():
    from transformers import GPT2Config, LlamaConfig

    from selfsup.lm.data.context import context_length
    from selfsup.lm.models.gpt import GPT

    assert context_length(GPT(10, block_size=24, n_layer=1, n_head=1, n_embd=8)) == 24
    assert context_length(GPT2Config(n_positions=96)) == 96
    assert context_length(LlamaConfig(max_position_embeddings=512)) == 512


def test_sft_names_the_line_beyond_the_context(models, tmp_path, capsys):
    out = tmp_path / "sft"
    base = ["lm", "sft", "--init", str(models / "base"), "--data", str(models / "sft.jsonl"),
            "--out", str(out), "--epochs", "1", "--accelerator", "cpu"]  # fmt: skip
    err = _error([*base, "--max-length", "1000"], capsys)
    assert "sft.jsonl:3: the conversation is 106 tokens long" in err
    assert f"context of {CONTEXT} tokens" in err and f"--max-length {CONTEXT}" in err
    assert not out.exists()
    err = _error([*base, "--max-length", "1000", "--pack"], capsys)
    assert f"blocks longer than the model's context of {CONTEXT}" in err


def test_reward_names_the_ranking_beyond_the_context(models, tmp_path, capsys):
    ranking = {"prompt": LONG, "completions": ["a", "b"], "ranking": "A > B"}
    data = tmp_path / "rankings.jsonl"
    data.write_text(json.dumps({**ranking, "prompt": "hi"}) + "\n" + json.dumps(ranking) + "\n")
    argv = ["lm", "reward", "--init", str(models / "chat"), "--data", str(data), "--out",
            str(tmp_path / "rm"), "--max-length", "500", "--accelerator", "cpu"]  # fmt: skip
    err = _error(argv, capsys)
    assert (
        "rankings.jsonl:2: a prompt with its answer is" in err and f"--max-length {CONTEXT}" in err
    )


@pytest.mark.parametrize("stage", ["rlhf", "grpo", "best-of-n"])
def test_sampling_stages_name_the_prompt_beyond_the_context(stage, models, tmp_path, capsys):
    argv = ["lm", stage, "--policy", str(models / "chat"), "--reward", str(models / "rm"),
            "--prompts", str(models / "prompts.jsonl")]  # fmt: skip
    if stage != "best-of-n":
        argv += ["--out", str(tmp_path / "run"), "--accelerator", "cpu"]
    err = _error(argv, capsys)
    assert "prompts.jsonl:2: the prompt is 103 tokens long" in err
    assert f"context of {CONTEXT} tokens" in err and "--truncate" in err
    assert not (tmp_path / "run").exists()
    err = _error([*argv, "--max-new-tokens", str(CONTEXT)], capsys)
    assert f"pass --max-new-tokens {CONTEXT // 2} or less" in err


def test_truncate_keeps_the_end_of_the_prompt_and_room_for_the_answer(models, capsys):
    from transformers import AutoTokenizer

    from selfsup.lm.data.context import fit_prompt, prompt_length

    tokenizer = AutoTokenizer.from_pretrained(models / "chat")
    messages = [{"role": "user", "content": "b" * 10 + "c" * 90}]
    (cut,) = fit_prompt(tokenizer, messages, CONTEXT, 24, "x", truncate=True)
    assert prompt_length(tokenizer, [cut]) == CONTEXT - 24  # as long as fits, no shorter
    assert cut["content"] == "c" * (CONTEXT - 24 - 3)  # the end, less <USER> <END> <ASSISTANT>
    capsys.readouterr()
    argv = ["lm", "best-of-n", "--policy", str(models / "chat"), "--reward", str(models / "rm"),
            "--prompts", str(models / "prompts.jsonl"), "--n", "1,2", "--truncate"]  # fmt: skip
    assert main(argv) == 0
    assert "   2 " in capsys.readouterr().out


def test_icl_refuses_shots_that_do_not_fit_naming_what_does(models, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"{i} =", "completion": str(i)} for i in range(30)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["lm", "icl", "few-shot", str(models / "base"), "--data", str(data), "--limit", "5"]
    err = _error([*argv, "--shots", "0,500"], capsys)
    # demonstrations "NN = NN\n" are 8 tokens, the longest question 4, 24 for the answer
    fitting = (CONTEXT - 24 - 4) // 8
    assert err.endswith(
        f"--shots 500: at most {fitting} demonstrations fit (25 pairs to draw from beside the "
        f"--limit 5 asked, the model's context of {CONTEXT} tokens with --max-new-tokens 24)"
    )
    capsys.readouterr()
    assert main([*argv, "--shots", f"0,{fitting}"]) == 0


def test_chat_sizes_its_default_to_the_context(models, monkeypatch, capsys):
    from transformers import GPT2LMHeadModel

    asked = []
    generate = GPT2LMHeadModel.generate

    def recording(self, *args, **kwargs):
        asked.append(kwargs["max_new_tokens"])
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GPT2LMHeadModel, "generate", recording)
    replies = iter(["hi", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    assert main(["lm", "chat", str(models / "chat")]) == 0
    assert asked == [CONTEXT // 2]
    err = _error(["lm", "chat", str(models / "chat"), "--max-new-tokens", "64"], capsys)
    assert f"pass --max-new-tokens {CONTEXT // 2} or less" in err


def test_ctrl_c_in_sft_names_the_checkpoint_and_a_resume_that_works(models, tmp_path, monkeypatch,
                                                                    capsys):  # fmt: skip
    from selfsup.core.run import RunFolder

    run = tmp_path / "sft"
    append = RunFolder.append_metrics

    def interrupted(folder, row, *args):
        if row.get("epoch") == 2:
            raise KeyboardInterrupt
        append(folder, row, *args)

    monkeypatch.setattr(RunFolder, "append_metrics", interrupted)
    argv = ["lm", "sft", "--init", str(models / "base"), "--data", str(models / "sft.jsonl"),
            "--out", str(run), "--epochs", "2", "--batch-size", "4", "--max-length", str(CONTEXT),
            "--accelerator", "cpu"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    resume = f"selfsup lm sft --resume {run}"
    assert err == (
        f"selfsup: interrupted; the last checkpoint is {run / 'checkpoints' / 'last.ckpt'}; "
        "continue with: " + resume
    )
    monkeypatch.setattr(RunFolder, "append_metrics", append)
    assert main(shlex.split(resume)[1:]) == 0
    assert [r.split(",")[0] for r in (run / "metrics.csv").read_text().splitlines()] == [
        "epoch", "1", "2",
    ]  # fmt: skip


def test_ctrl_c_of_a_sampling_stage_names_the_policy_kept(tmp_path):
    from selfsup.lm.alignment.online import interrupted_hint

    saved = ["the starting one, sft", str(tmp_path / "run" / "iter0010")]
    assert interrupted_hint("grpo", saved, tmp_path / "run") == (
        f"the last policy saved is {saved[1]} (selfsup lm chat {saved[1]}); grpo does not "
        "resume: run it again with another --out to train further"
    )
    assert "run the same command again" in interrupted_hint("rlhf", saved[:1], tmp_path)


def test_a_hub_id_says_it_needs_a_network_and_what_to_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    err = _error(["lm", "chat", "Qwen/Qwen2-0.5B"], capsys)
    assert "Qwen/Qwen2-0.5B is no local folder, and Hub ids need a network (HF_HUB_OFFLINE" in err
    assert "--local-dir FOLDER" in err
    (tmp_path / "runs").mkdir()
    assert _error(["lm", "chat", "runs/sft"], capsys).endswith("runs/sft does not exist")


def test_small_models_train_on_one_cpu_thread():
    from torch import nn

    from selfsup.lm.training.pretrain import SMALL_MODEL, cpu_threads

    assert cpu_threads(0, nn.Linear(100, 100)) == 1
    assert cpu_threads(3, nn.Linear(100, 100)) == 3  # --threads wins
    assert SMALL_MODEL > 1_000_000  # the baby GPT (0.8M parameters) is small
