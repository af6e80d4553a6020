"""The lean sampler on the Llama family (Llama, Qwen2, Mistral: rotary positions, grouped-query
attention, RMSNorm, gated MLP) against transformers' own forward and `generate`, and the models
it must leave to them (other rotary scalings, short sliding windows, dropout, peft methods
other than LoRA). LoRA models are served exactly, GPT-2 ones too."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)

from selfsup.lm.alignment.decoding import (
    GPT2Decoder,
    LlamaDecoder,
    continuation_logits,
    continuation_positions,
    decoder_class,
    position_ids,
    sample_tokens,
    sequence_scores,
)

VOCAB, EOS, PAD = 23, 3, 22
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD,
             initializer_range=0.1)  # fmt: skip
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8, rope_theta=500000.0)  # fmt: skip
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8, rope_theta=1e4)
MODELS = {  # name: (class, config)
    "llama": (LlamaForCausalLM, LlamaConfig(**SMALL)),
    "llama-theta-tied-biases": (LlamaForCausalLM, LlamaConfig(
        **SMALL, rope_theta=500.0, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "llama-mqa-head-dim": (LlamaForCausalLM, LlamaConfig(**{**SMALL, "num_key_value_heads": 1},
                                                         head_dim=12)),
    "llama3-rope": (LlamaForCausalLM, LlamaConfig(**SMALL, rope_parameters=LLAMA3)),
    "linear-rope": (LlamaForCausalLM, LlamaConfig(
        **SMALL, rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4))),
    "yarn-rope": (LlamaForCausalLM, LlamaConfig(**SMALL, rope_parameters=YARN)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**{**SMALL, "hidden_size": 48,
                                                "num_attention_heads": 6})),
    "mistral": (MistralForCausalLM, MistralConfig(**SMALL, head_dim=16, sliding_window=64)),
}  # fmt: skip


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    cls, config = MODELS[name]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # biases are zero at initialisation: make them count
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _left_padded_prompts(lengths=(7, 3, 5, 1, 7, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.full((len(lengths), max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(4, 20, (n,))
        mask[row, -n:] = 1
    return ids, mask


def _stepwise_logits(model, ids, mask, more):
    """The lean decoder's logits: the prompts at once, then `more` one token at a time; and
    transformers' forward over the whole rows at the same positions."""
    full_ids, full_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
    positions = position_ids(full_mask)
    with torch.no_grad():
        expected = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions)
        decoder = decoder_class(model, full_ids.shape[1])(model, len(ids), full_ids.shape[1])
        p, key_mask = ids.shape[1], full_mask.bool()
        got = [decoder(ids, positions[:, :p], key_mask)]
        for t in range(more.shape[1] - 1):
            got.append(decoder(more[:, t : t + 1], positions[:, p + t : p + t + 1], key_mask))
    return torch.stack(got, 1), expected.logits[:, p - 1 : -1]


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_logits_equal_the_full_forward(name):
    """Prefill, then one token at a time: each step's logits are transformers' forward over the
    whole left-padded rows (grouped-query attention, rotary scalings, biases, tied heads)."""
    model = _model(name)
    assert decoder_class(model, 20) is LlamaDecoder
    ids, mask = _left_padded_prompts()
    more = torch.randint(4, 20, (len(ids), 5))
    got, expected = _stepwise_logits(model, ids, mask, more)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert expected.std() > 0.01  # a model whose logits differ between tokens


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-mqa-head-dim"])
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (1.5, 4)])
def test_the_same_tokens_as_generate(name, temperature, top_k):
    """With the same seed the lean loop draws what `generate` draws, token for token:
    suppressed tokens, temperature, top-k, padding after the end token."""
    model = _model(name)
    ids, mask = _left_padded_prompts()
    suppressed = (0, 1, PAD)
    ended_early = 0
    for seed in range(3):
        torch.manual_seed(seed)
        reference = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
            top_k=top_k or None, top_p=None, max_new_tokens=10, eos_token_id=EOS,
            pad_token_id=PAD, suppress_tokens=list(suppressed),
        )[:, ids.shape[1] :]  # fmt: skip
        torch.manual_seed(seed)
        tokens = sample_tokens(
            model, ids, mask, 10, temperature=temperature, top_k=top_k, suppressed=suppressed,
            eos_token_id=EOS, pad_token_id=PAD,
        )  # fmt: skip
        assert tokens is not None
        assert torch.equal(tokens, reference)
        ended_early += int((tokens == PAD).any(1).sum())
    assert ended_early > 0  # the padding after an end token was exercised


@pytest.mark.parametrize("cls,config", [(LlamaForSequenceClassification, LlamaConfig),
                                        (Qwen2ForSequenceClassification, Qwen2Config)])  # fmt: skip
def test_reward_scores_equal_the_model(cls, config):
    """A Llama/Qwen2 reward model's scores, read at each row's last real token (left-padded
    prompts, right-padded answers), equal transformers' sequence-classification forward."""
    torch.manual_seed(4)
    model = cls(config(**SMALL, num_labels=1)).eval()
    prompts, prompt_mask = _left_padded_prompts()
    answers = torch.randint(4, 20, (len(prompts), 5))
    answer_mask = torch.ones_like(answers)
    answer_mask[1, 2:] = answer_mask[4, 4:] = 0
    answers[answer_mask == 0] = PAD
    ids, mask = torch.cat([prompts, answers], 1), torch.cat([prompt_mask, answer_mask], 1)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    scores = sequence_scores(model, ids, mask)
    assert scores is not None
    torch.testing.assert_close(scores, expected.logits, atol=1e-5, rtol=1e-5)
    assert scores.std() > 1e-3  # rows differ: reading the wrong token would show


def test_continuations_of_shared_prefixes():
    """A reference model's logits of answers after repeated prompts (each prompt run once, its
    cache copied to every row that follows it) equal the whole rows' forward."""
    model = _model("qwen2")
    prompts, prompt_mask = _left_padded_prompts()
    rows = torch.tensor([1, 1, 4, 4, 4, 0])
    answers = torch.randint(4, 20, (len(rows), 5))
    answer_mask = torch.ones_like(answers)
    answer_mask[0, 2:] = 0
    inputs = answers[:, :-1]
    prefix = (prompts, position_ids(prompt_mask), prompt_mask)
    rest = (inputs, continuation_positions(prompt_mask, rows, inputs.shape[1]),
            torch.cat([prompt_mask[rows], answer_mask[:, :-1]], 1))  # fmt: skip
    got = continuation_logits(model, prefix, rows, rest)
    ids, mask = (
        torch.cat([prompts[rows], answers], 1),
        torch.cat([prompt_mask[rows], answer_mask], 1),
    )
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    real = answer_mask.bool()
    expected = whole.logits[:, prompts.shape[1] - 1 : -1]
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_models_it_cannot_serve_fall_back_to_generate():
    ids, mask = _left_padded_prompts()
    options = dict(temperature=1.0, top_k=0, suppressed=(), eos_token_id=EOS, pad_token_id=PAD)
    dynamic = LlamaForCausalLM(
        LlamaConfig(**SMALL, rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4))
    ).eval()  # its frequencies change with the length
    assert sample_tokens(dynamic, ids, mask, 4, **options) is None
    window = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=ids.shape[1] + 3)).eval()
    assert sample_tokens(window, ids, mask, 3, **options) is not None
    assert sample_tokens(window, ids, mask, 4, **options) is None  # past the window
    dropout = LlamaForCausalLM(LlamaConfig(**SMALL, attention_dropout=0.1)).train()
    assert sample_tokens(dropout, ids, mask, 4, **options) is None
    assert sample_tokens(dropout.eval(), ids, mask, 4, **options) is not None


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_lora_models_are_served_exactly(peft, name):
    """A peft LoRA model (adapters with weights, on the attention and the MLP) is served through
    its base model with the adapter layers called: logits equal the peft model's forward, with
    adapters on and, inside `disable_adapter()`, off (the base model's)."""
    if name == "gpt2":
        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=24, n_layer=2,
                                          n_head=3)).eval()  # fmt: skip
        targets = ["c_attn", "c_fc"]
    else:
        base, targets = _model("llama"), ["q_proj", "v_proj", "down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval()
    ids, mask = _left_padded_prompts()
    more = torch.randint(4, 20, (len(ids), 4))
    plain = GPT2Decoder if name == "gpt2" else LlamaDecoder
    assert decoder_class(model, 20) is plain
    got, expected = _stepwise_logits(model, ids, mask, more)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        off, base_logits = _stepwise_logits(model, ids, mask, more)
    torch.testing.assert_close(off, base_logits, atol=1e-5, rtol=1e-5)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapters change the outputs


def test_lora_dropout_and_other_peft_methods_fall_back(peft):
    ids, mask = _left_padded_prompts()
    options = dict(temperature=1.0, top_k=0, suppressed=(), eos_token_id=EOS, pad_token_id=PAD)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1)
    model = peft.get_peft_model(_model("llama"), lora)
    assert sample_tokens(model.train(), ids, mask, 4, **options) is None  # dropout applies
    assert sample_tokens(model.eval(), ids, mask, 4, **options) is not None
    prompt = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    tuned = peft.get_peft_model(_model("llama"), prompt).eval()  # virtual tokens: not ours
    assert sample_tokens(tuned, ids, mask, 4, **options) is None
