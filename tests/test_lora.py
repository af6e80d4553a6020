"""LoRA adapters (`--lora-r`, peft): the adapted model starts as its base, SFT trains the
adapters only, the run keeps the adapter and resumes, `lm export --merge` writes the model the
Auto classes load, and the stages with a reference use the base with its adapters off instead of
a second copy."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import selfsup
from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.lm.models import lora
from selfsup.lm.options import LoraOptions
from selfsup.lm.training import posttrain

pytestmark = pytest.mark.usefixtures("one_thread")

SFT = {"batch_size": 8, "max_length": 48, "accelerator": "cpu", "lr": 1e-2, "lora_r": 4,
       "progress": False, "report": False}  # fmt: skip


def _sft(chat_base: Path, out: Path, **options) -> Path:
    init, data = str(chat_base / "base"), str(chat_base / "sft.jsonl")
    return selfsup.align("sft", init=init, data=data, out=str(out), **{**SFT, **options})


@pytest.fixture(scope="module")
def lora_sft(chat_base, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A LoRA SFT run of two epochs, and its trained (adapted) model."""
    trained = {}
    original = posttrain._train

    def capture(*args):
        trained["model"] = args[4]
        return original(*args)

    posttrain._train = capture
    try:
        run = _sft(chat_base, tmp_path_factory.mktemp("lora") / "sft", epochs=2)
    finally:
        posttrain._train = original
    return run, trained["model"]


def _base(chat_base: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(chat_base / "base")
    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)


def _adapted_from_disk(run: Path, chat_base: Path):
    """The run's model as peft loads it, adapter not merged: the base, grown to the run's
    tokenizer, with RUN/hf's adapter (independent of `lora.load_tokenizer_and`)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(run / "hf"))
    _, base = _base(chat_base)
    base.resize_token_embeddings(len(tokenizer))
    return tokenizer, PeftModel.from_pretrained(base, str(run / "hf")).eval()


def _logprobs(model, ids: list[int], labels: list[int]) -> float:
    """Summed log-probability of the labelled tokens, written out."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    logp = logits.log_softmax(-1)
    return sum(logp[t, y].item() for t, y in enumerate(labels[1:]) if y != -100)


def test_the_adapted_model_starts_as_its_base(chat_base):
    tokenizer, model = _base(chat_base)
    model.eval()
    ids = torch.randint(0, len(tokenizer), (2, 12))
    before = model(input_ids=ids).logits
    adapted = lora.adapt(model, LoraOptions(lora_r=4), chat_base / "base", tokenizer).eval()
    assert lora.is_adapted(adapted)
    assert torch.equal(adapted(input_ids=ids).logits, before)  # B = 0: exactly the base
    trained = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "trainable_tokens" in n for n in trained)


def test_sft_trains_the_adapters_only_and_the_loss_goes_down(lora_sft, chat_base):
    run, model = lora_sft
    files = {p.name for p in (run / "hf").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    config = json.loads((run / "hf" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8  # default alpha 2r
    assert Path(config["base_model_name_or_path"]) == (chat_base / "base").resolve()
    losses = [float(line.split(",")[1]) for line in (run / "metrics.csv").read_text().split()[1:]]
    assert len(losses) == 2 and losses[-1] < losses[0]
    _, base = _base(chat_base)
    original = dict(base.named_parameters())
    changed = 0
    for name, p in model.get_base_model().named_parameters():
        if "lora_" in name or "trainable_tokens" in name:
            changed += not torch.equal(p, torch.zeros_like(p)) if "lora_B" in name else 0
            continue
        key = name.replace(".base_layer", "").replace(".token_adapter", "")
        rows = original[key].shape[0]  # the chat markers' new rows are the resize's
        assert torch.equal(p[:rows], original[key]), name  # the base weights bit-identical
    assert changed > 0  # the adapters learned


def test_resume_continues_as_an_uninterrupted_run(lora_sft, chat_base, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    export = posttrain.ExportHF.on_train_epoch_end

    def interrupt(self, trainer, module):  # Ctrl-C once epoch 1 is checkpointed and exported
        export(self, trainer, module)
        raise KeyboardInterrupt

    monkeypatch.setattr(posttrain.ExportHF, "on_train_epoch_end", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _sft(chat_base, tmp_path / "resumed", epochs=2)
    monkeypatch.undo()
    run = selfsup.align("sft", resume=str(tmp_path / "resumed"), progress=False, report=False)
    assert len((run / "metrics.csv").read_text().split()) == 3  # header and 2 epochs
    a = load_file(str(lora_sft[0] / "hf" / "adapter_model.safetensors"))
    b = load_file(str(run / "hf" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_the_merged_export_is_the_adapted_model(lora_sft, chat_base, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run = lora_sft[0]
    out = tmp_path / "merged"
    assert main(["lm", "export", str(run), "--merge", "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer, adapted = _adapted_from_disk(run, chat_base)
    ids = torch.randint(0, len(tokenizer), (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=0, atol=1e-5
        )
        with adapted.disable_adapter():  # training moved it away from its base
            assert not torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits)
    assert main(["lm", "export", str(run), "--out", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "adapter_model.safetensors").is_file()
    with pytest.raises(SelfsupError, match="exists and is not an empty folder"):
        lora.export(run, out, merge=True)


def _dpo_data(chat_base: Path) -> str:
    lines = [
        {"prompt": f"what is {i} plus {i}?", "chosen": f"it is {2 * i}.", "rejected": f"{i}."}
        for i in range(8)
    ]
    path = chat_base / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(path)


def _captured_dpo(monkeypatch, **options) -> dict:
    """What `lm dpo` hands to posttrain's loop (policy, pairs with their reference
    log-probabilities) and the reference it scored them with, without training."""
    from selfsup.lm.alignment import dpo

    seen: dict = {}
    score = dpo._with_reference

    def with_reference(reference, examples, pad):
        seen["reference"] = reference
        return score(reference, examples, pad)

    def fit_stage(stage, config, command, model, tokenizer, train, val, loss_fn):
        seen.update(model=model, train=train)
        return Path(config.out)

    monkeypatch.setattr(dpo, "_with_reference", with_reference)
    monkeypatch.setattr(dpo, "fit_stage", fit_stage)
    selfsup.align("dpo", accelerator="cpu", report=False, **options)
    return seen


def test_dpo_with_lora_scores_the_reference_without_a_copy(lora_sft, chat_base, monkeypatch):
    from selfsup.lm.alignment import dpo

    data, init = _dpo_data(chat_base), str(lora_sft[0])  # a LoRA run: its adapter merged
    full = _captured_dpo(monkeypatch, init=init, data=data, out="unused")
    ptrs = {p.data_ptr() for p in full["model"].parameters()}
    assert ptrs.isdisjoint(p.data_ptr() for p in full["reference"].parameters())  # a copy

    def no_copy(*_):
        raise AssertionError("DPO with LoRA copied the model")

    monkeypatch.setattr(dpo, "copy", SimpleNamespace(deepcopy=no_copy))
    seen = _captured_dpo(monkeypatch, init=init, data=data, out="unused", lora_r=2)
    assert isinstance(seen["reference"], lora.Reference) and lora.is_adapted(seen["model"])
    assert {p.data_ptr() for p in seen["reference"].parameters()} == {
        p.data_ptr() for p in seen["model"].parameters()
    }  # the policy itself, adapters off
    _, sft_model = _adapted_from_disk(lora_sft[0], chat_base)  # the SFT model, unmerged
    with torch.no_grad():
        for chosen, rejected, ref_chosen, ref_rejected in seen["train"]:
            assert _logprobs(sft_model, *chosen) == pytest.approx(ref_chosen, abs=1e-4)
            assert _logprobs(sft_model, *rejected) == pytest.approx(ref_rejected, abs=1e-4)


def test_grpo_and_ppo_with_lora_keep_the_base_as_reference(lora_sft, chat_base):
    from transformers import GPT2ForSequenceClassification

    from selfsup.lm.alignment.grpo import GRPOTrainer
    from selfsup.lm.alignment.grpo import Options as GRPOOptions
    from selfsup.lm.alignment.ppo import PPOTrainer
    from selfsup.lm.alignment.rollout import forward_response, sample
    from selfsup.lm.options import PPOSettings

    tokenizer, sft = lora.load_tokenizer_and(
        lora_sft[0], __import__("transformers").AutoModelForCausalLM
    )
    prompts = [[{"role": "user", "content": f"what is {i} plus {i}?"}] for i in range(2)]
    r = sample(sft, tokenizer, prompts, 6, 1.0, 0, 0)
    with torch.no_grad():
        expected = forward_response(sft, r)[1]
    options = GRPOOptions(lora_r=2, group_size=2, max_new_tokens=6, lr=1e-2)
    policy = lora.adapt(sft, options, lora_sft[0], tokenizer)
    trainer = GRPOTrainer(policy, tokenizer, options)
    trainer.step(prompts, [0, 1], 0, lambda rollout, idx: torch.randn(len(idx)))
    with torch.no_grad():
        torch.testing.assert_close(forward_response(trainer.reference, r)[1], expected)
        assert not torch.allclose(forward_response(trainer.policy, r)[1], expected)
    reward = GPT2ForSequenceClassification(
        sft.config.__class__(**{**sft.config.to_dict(), "num_labels": 1})
    )
    ppo = PPOTrainer(
        policy, reward, tokenizer, PPOSettings(rollouts=2, minibatch=2, max_new_tokens=6)
    )
    assert isinstance(ppo.reference, lora.Reference)
    ppo.step(prompts, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(forward_response(ppo.reference, r)[1], expected)


def test_the_reward_models_score_head_trains_and_round_trips(chat_base, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from selfsup.lm.models import hf

    tokenizer, model = hf.load_tokenizer_and(
        chat_base / "base", AutoModelForSequenceClassification, num_labels=1
    )
    posttrain.prepare_chat(model, tokenizer)  # chat markers and padding, as `lm reward`
    adapted = lora.adapt(model, LoraOptions(lora_r=2), chat_base / "base", tokenizer)
    trained = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trained)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.1)
    hf.save_hf(tmp_path, adapted, tokenizer)
    ids = torch.randint(1, len(tokenizer), (2, 8))
    _, loaded = lora.load_tokenizer_and(tmp_path, AutoModelForSequenceClassification)
    with torch.no_grad():
        expected = adapted.eval()(input_ids=ids).logits
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_without_peft_it_is_one_line(chat_base, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(SelfsupError, match=r"^--lora-r needs peft.*pip install 'selfsup\[lora\]'$"):
        _sft(chat_base, tmp_path / "none", epochs=1)
    with pytest.raises(SelfsupError, match=r"^--lora-r must be zero or more, got -1$"):
        _sft(chat_base, tmp_path / "none", epochs=1, lora_r=-1)


def test_later_stages_and_chat_start_from_a_lora_run(lora_sft, chat_base, tmp_path):
    """`lm reward --init LORA_RUN`, `lm sft --init LORA_RUN` and `lm chat LORA_RUN` read the
    adapter merged into its base: the merged model's logits are peft's own (adapter unmerged)."""
    from transformers import AutoModelForCausalLM

    run = lora_sft[0]
    tokenizer, merged = lora.load_tokenizer_and(run, AutoModelForCausalLM)
    _, adapted = _adapted_from_disk(run, chat_base)
    ids = torch.randint(0, len(tokenizer), (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(
            merged.eval()(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=0, atol=1e-5
        )
    rankings = tmp_path / "rankings.jsonl"
    rows = [
        {"prompt": f"what is {i} plus {i}?", "chosen": f"it is {2 * i}.", "rejected": f"{i}."}
        for i in range(6)
    ]
    rankings.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = ["--accelerator", "cpu", "--epochs", "1", "--batch-size", "4"]
    assert main(["lm", "reward", "--init", str(run), "--data", str(rankings),
                 "--out", str(tmp_path / "rm"), *common]) == 0  # fmt: skip
    assert main(["lm", "sft", "--init", str(run), "--data", str(chat_base / "sft.jsonl"),
                 "--out", str(tmp_path / "sft2"), "--lora-r", "2", *common]) == 0  # fmt: skip
    config = json.loads((tmp_path / "sft2" / "hf" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((run / "hf").resolve())
    _, chained = lora.load_tokenizer_and(tmp_path / "sft2", AutoModelForCausalLM)
    assert chained.get_input_embeddings().num_embeddings == len(tokenizer)


def _tiny(name: str) -> torch.nn.Module:
    """A random-initialised tiny Llama (tied head, grouped-query attention) or GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "gpt2":
        config = GPT2Config(vocab_size=23, n_positions=32, n_embd=24, n_layer=2, n_head=3)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(vocab_size=23, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=22,
                         tie_word_embeddings=True, initializer_range=0.1)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _nonzero_adapters(base: torch.nn.Module) -> torch.nn.Module:
    """`base` with LoRA on every linear layer (B not zero) and trainable rows 20, 22 of the
    (tied) embedding moved, as `lora.adapt` builds them."""
    import peft

    names = lora._embedding_names(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                             init_lora_weights=False,
                             trainable_token_indices={names["in"]: [20, 22]})  # fmt: skip
    with lora._quiet():
        model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _generated(model, ids, mask, seed: int, **options) -> torch.Tensor:
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=None,
                         top_p=None, max_new_tokens=10, **options)  # fmt: skip
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sampling_an_adapted_model_is_sampling_its_merged_model(name, monkeypatch):
    """The lean sampler serves a LoRA model (non-zero B, trainable token rows) by merged weights
    made once per round: with a fixed seed it draws what `generate` of peft's merged model
    draws, token for token, without calling a LoRA layer per token, and leaves every weight of
    the adapted model bit-identical; its reference (adapters off) samples as the base does."""
    import copy

    from peft.tuners.lora.layer import Linear as LoraLinear

    from selfsup.lm.alignment.decoding import sample_tokens

    base = _tiny(name)
    plain = copy.deepcopy(base)
    model = _nonzero_adapters(base)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    ids = torch.randint(3, 20, (6, 7))
    ids[:3, :3], ids[:, -1] = 22, 20  # left padding; a trainable token in every prompt
    mask = (ids != 22).long()
    options = dict(eos_token_id=3, pad_token_id=22, suppress_tokens=[22, 0])
    lean = dict(temperature=1.0, top_k=0, suppressed=(0, 22), eos_token_id=3, pad_token_id=22)
    calls = []
    forward = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    reference = lora.Reference(model)
    differ = 0
    for seed in range(3):
        torch.manual_seed(seed)
        got = sample_tokens(model, ids, mask, 10, **lean)
        assert got is not None and not calls  # the lean loop, no LoRA layer called
        assert len(got.unique()) > 5  # a spread of tokens, not one
        expected = _generated(merged, ids, mask, seed, **options)
        assert torch.equal(got, expected[:, : got.shape[1]])
        assert (expected[:, got.shape[1] :] == 22).all()
        torch.manual_seed(seed)
        off = sample_tokens(reference, ids, mask, 10, **lean)
        base_tokens = _generated(plain, ids, mask, seed, **options)
        assert off is not None and torch.equal(off, base_tokens[:, : off.shape[1]])
        differ += not torch.equal(got, off[:, : got.shape[1]])
    assert differ  # the adapters change what is drawn
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing merged in place


def test_the_reference_is_scored_in_one_adapters_off_pass(monkeypatch):
    """`forward_response` of `lora.Reference` by the lean decoders: the base model's
    log-probabilities (1e-5), inside one `disable_adapter()` for the batch; the policy's are
    the merged model's."""
    import copy

    from selfsup.lm.alignment.rollout import Rollout, forward_response

    base = _tiny("llama")
    plain = copy.deepcopy(base)
    model = _nonzero_adapters(base)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    torch.manual_seed(2)
    prompts = torch.randint(3, 20, (4, 5)).repeat_interleave(2, 0)  # prompts in pairs
    answers = torch.randint(3, 22, (8, 6))
    response_mask = torch.ones_like(answers)
    response_mask[::3, 4:] = 0
    rollout = Rollout(torch.cat([prompts, answers], 1),
                      torch.cat([torch.ones_like(prompts), response_mask], 1), 5, response_mask,
                      response_mask[:, -1].bool())  # fmt: skip
    entered = []
    disable = type(model).disable_adapter
    monkeypatch.setattr(type(model), "disable_adapter",
                        lambda self: entered.append(1) or disable(self))  # fmt: skip
    with torch.no_grad():
        ref = forward_response(lora.Reference(model), rollout)[1]
        assert len(entered) == 1
        torch.testing.assert_close(ref, forward_response(plain, rollout)[1], rtol=0, atol=1e-5)
        policy = forward_response(model, rollout)[1]
        torch.testing.assert_close(policy, forward_response(merged, rollout)[1], rtol=0, atol=1e-5)
        assert (policy - ref).abs().max() > 1e-2
