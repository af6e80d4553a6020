"""Any Hugging Face causal LM through the language stages: tiny random Llama, Qwen2, GPT-NeoX and
GPT-2 models, each with a BPE tokenizer trained here and a chat template of its own, run SFT ->
reward -> DPO -> GRPO -> PPO -> chat from the command line; the loss masks are checked against
the template's assistant spans found independently; Hub names offline. No downloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError

pytestmark = pytest.mark.usefixtures("one_thread")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
ZEPHYR = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PLAIN = (  # no role tokens: the turn ends at eos
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)
# architecture: (config class, its size fields, template, special tokens, roles, end of turn)
ARCHS = {
    "qwen2": ("Qwen2Config", CHATML, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
              ["<|im_start|>"], "<|im_end|>"),
    "llama": ("LlamaConfig", LLAMA3, {"bos_token": "<|begin_of_text|>",
              "eos_token": "<|end_of_text|>"},
              ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "gpt_neox": ("GPTNeoXConfig", ZEPHYR, {"eos_token": "<|endoftext|>"},
                 ["<|user|>", "<|assistant|>", "<|system|>"], "<|endoftext|>"),
    "gpt2": ("GPT2Config", PLAIN, {"eos_token": "<|endoftext|>"}, [], "<|endoftext|>"),
}  # fmt: skip
QUESTIONS = ["what is two plus three?", "name a colour.", "is the sky blue?", "say hello."]
ANSWERS = ["five.", "red.", "yes, it is.", "hello there."]
SENTENCES = [*QUESTIONS, *ANSWERS, "user assistant system: a good bad answer to the question"]


def _conversations() -> list[list[dict[str, str]]]:
    out = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in zip(QUESTIONS, ANSWERS, strict=True)
    ]
    out.append([  # two assistant turns and a system message
        {"role": "system", "content": "be brief."},
        *out[0],
        {"role": "user", "content": QUESTIONS[1]},
        {"role": "assistant", "content": ANSWERS[1]},
    ])  # fmt: skip
    return out


def _tokenizer(arch: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _, template, special, extra, _ = ARCHS[arch]
    tokens = [*dict.fromkeys([*special.values(), *extra])]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(SENTENCES * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **special)
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    tokenizer.chat_template = template
    return tokenizer


def _model(arch: str, vocab: int, tokenizer):
    import transformers

    torch.manual_seed(0)
    cls = getattr(transformers, ARCHS[arch][0])
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if arch == "gpt2":
        config = cls(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128, **ids)
    else:
        config = cls(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                     **ids)  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("any-lm-data")
    lines = [json.dumps({"messages": c}) for c in _conversations()]
    (root / "sft.jsonl").write_text("\n".join(lines * 2) + "\n")
    pairs = [
        json.dumps({"prompt": q, "chosen": a, "rejected": ANSWERS[(i + 1) % 4]})
        for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS, strict=True))
    ]
    (root / "pairs.jsonl").write_text("\n".join(pairs * 2) + "\n")
    (root / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": q}) for q in QUESTIONS))
    return root


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """architecture -> a local HF folder (random model, BPE tokenizer, chat template), each
    built once, when first asked for."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            folder = tmp_path_factory.mktemp(arch) / "base"
            tokenizer = _tokenizer(arch)
            _model(arch, len(tokenizer), tokenizer).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            built[arch] = folder
        return built[arch]

    return get


@pytest.fixture(params=list(ARCHS))
def base(request, bases) -> tuple[str, Path]:
    return request.param, bases(request.param)


def _expected_mask(tokenizer, messages, end: str) -> tuple[list[int], list[bool]]:
    """The template's rendering tokenized whole, and the tokens inside an assistant turn's
    content or its end-of-turn token (located by character offsets, independently)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for m in messages:
        start = text.index(m["content"], cursor)
        cursor = start + len(m["content"])
        if m["role"] == "assistant":
            assert text[cursor : cursor + len(end)] == end
            spans.append((start, cursor + len(end)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(s <= a and b <= e for s, e in spans) for a, b in encoded["offset_mapping"]]
    return encoded["input_ids"], trained


def test_the_loss_mask_is_the_templates_assistant_spans(base):
    from transformers import AutoTokenizer

    from selfsup.lm.alignment.rollout import encode_prompts, suppressed_tokens
    from selfsup.lm.data.chat_data import add_chat_tokens, sft_example
    from selfsup.lm.data.conversations import CHAT_TEMPLATE, render_prompt

    arch, folder = base
    end = ARCHS[arch][4]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert add_chat_tokens(tokenizer) == 0  # nothing added: the model's own template stays
    assert tokenizer.chat_template == ARCHS[arch][1] != CHAT_TEMPLATE
    assert tokenizer.eos_token == end and tokenizer.pad_token is not None
    for messages in _conversations():
        ids, labels = sft_example(tokenizer, messages, 10**6)
        expected_ids, expected = _expected_mask(tokenizer, messages, end)
        assert ids == expected_ids
        assert [label != -100 for label in labels] == expected and sum(expected) > 0
    # prompts end with the template's generation prompt, left-padded
    prompts = [m[:1] for m in _conversations()[:2]]
    batch = encode_prompts(tokenizer, prompts)
    for row, messages in zip(batch["input_ids"], prompts, strict=True):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_prompt(messages, tokenizer) == text
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert row[-len(want) :].tolist() == want
    assert (batch["attention_mask"][:, -1] == 1).all()
    # the end of turn may be sampled; starting another turn may not
    suppressed = suppressed_tokens(tokenizer)
    assert tokenizer.convert_tokens_to_ids(end) not in suppressed
    for role_token in ARCHS[arch][3]:
        if role_token != end:
            assert tokenizer.convert_tokens_to_ids(role_token) in suppressed


def test_every_stage_runs_on_the_architecture(base, data, tmp_path, monkeypatch, capsys):
    arch, folder = base
    cpu = ["--accelerator", "cpu"]
    epoch = ["--epochs", "1", "--batch-size", "4", "--max-length", "96", *cpu]
    sft, rm, dpo = tmp_path / "sft", tmp_path / "rm", tmp_path / "dpo"
    assert main(["lm", "sft", "--init", str(folder), "--data", str(data / "sft.jsonl"),
                 "--out", str(sft), *epoch]) == 0  # fmt: skip
    assert "chat template" not in capsys.readouterr().err  # no note: its own template is used
    saved = json.loads((sft / "hf" / "tokenizer_config.json").read_text())
    template = saved.get("chat_template") or (sft / "hf" / "chat_template.jinja").read_text()
    assert template == ARCHS[arch][1]  # the export keeps the model's own template
    assert main(["lm", "reward", "--init", str(sft), "--data", str(data / "pairs.jsonl"),
                 "--out", str(rm), *epoch]) == 0  # fmt: skip
    assert main(["lm", "dpo", "--init", str(sft), "--data", str(data / "pairs.jsonl"),
                 "--out", str(dpo), *epoch]) == 0  # fmt: skip
    online = ["--policy", str(sft), "--reward", str(rm), "--prompts", str(data / "prompts.jsonl"),
              "--iterations", "1", "--eval-every", "1", "--eval-samples", "2",
              "--max-new-tokens", "6", *cpu]  # fmt: skip
    assert (
        main(
            [
                "lm",
                "grpo",
                *online,
                "--out",
                str(tmp_path / "grpo"),
                "--prompts-per-iteration",
                "2",
                "--group-size",
                "2",
                "--minibatch",
                "4",
            ]
        )
        == 0
    )
    assert main(["lm", "rlhf", *online, "--out", str(tmp_path / "ppo"),
                 "--rollouts", "4", "--minibatch", "4"]) == 0  # fmt: skip
    replies = iter(["say hello.", "", "is the sky blue?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    capsys.readouterr()
    assert main(["lm", "chat", str(tmp_path / "ppo"), "--max-new-tokens", "6"]) == 0
    assert main(["lm", "chat", str(folder), "--max-new-tokens", "6"]) == 0  # the raw folder too
    assert capsys.readouterr().out.count("assistant>") == 2


def test_best_of_n_and_icl_take_a_foreign_model(bases, data, tmp_path):
    folder = bases("llama")  # one architecture is enough here: the loaders are shared
    from selfsup.lm.evaluation.icl import few_shot

    rm = tmp_path / "rm"
    assert main(["lm", "reward", "--init", str(folder), "--data", str(data / "pairs.jsonl"),
                 "--out", str(rm), "--epochs", "1", "--accelerator", "cpu"]) == 0  # fmt: skip
    assert main(["lm", "best-of-n", "--policy", str(folder), "--reward", str(rm), "--prompts",
                 str(data / "prompts.jsonl"), "--n", "1,2", "--limit", "2",
                 "--max-new-tokens", "4"]) == 0  # fmt: skip
    qa = [
        json.dumps({"prompt": q, "completion": a}) for q, a in zip(QUESTIONS, ANSWERS, strict=True)
    ]
    (tmp_path / "qa.jsonl").write_text("\n".join(qa) + "\n")
    accuracy = few_shot(str(folder), str(tmp_path / "qa.jsonl"), [0, 1], questions=2,
                            max_new_tokens=3)  # fmt: skip
    assert set(accuracy) == {0, 1}


def test_a_hub_name_offline_is_one_line_and_a_cached_one_loads(bases, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1: a made-up id says it needs a network and what to pass; an id in the
    (faked) Hugging Face cache loads from there."""
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    from selfsup.lm.models import hf

    folder = bases("qwen2")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SelfsupError) as e:
        hf.load_tokenizer_and("nobody-here/made-up-model", AutoModelForCausalLM)
    assert "Hub ids need a network (HF_HUB_OFFLINE is set" in str(e.value)
    assert "--local-dir FOLDER" in str(e.value) and "\n" not in str(e.value)
    # the cache's layout: models--OWNER--NAME/{refs/main, snapshots/COMMIT/FILES}
    repo = tmp_path / "hub" / "models--someone--tiny-chat"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    tokenizer, model = hf.load_tokenizer_and("someone/tiny-chat", AutoModelForCausalLM)
    assert tokenizer.chat_template == CHATML and model.config.model_type == "qwen2"
    assert hf.hf_dir("someone/tiny-chat") == snapshot
