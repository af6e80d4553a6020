"""Sharing work in post-training: the lean GPT-2 sampling loop against `generate`, and
repeated prompts run once, against running every row whole."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from selfsup.lm.alignment.decoding import GPT2Decoder, sample_tokens

VOCAB, EOS, PAD = 23, 3, 22


def _gpt2(seed: int = 0, **config) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    defaults = dict(vocab_size=VOCAB, n_positions=48, n_embd=24, n_layer=3, n_head=3,
                    attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(GPT2Config(**{**defaults, **config})).eval()


def _left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    lengths = [7, 3, 5, 1, 7, 6]
    ids = torch.full((len(lengths), max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(4, 20, (n,))
        mask[row, -n:] = 1
    return ids, mask


def _rollout(prompts, prompt_mask, group, answers, answer_mask):
    """Answers (right-padded) after the left-padded prompts that `group` names, row by row."""
    from selfsup.lm.alignment.rollout import Rollout

    sequences = torch.cat([prompts[group], answers], 1)
    attention_mask = torch.cat([prompt_mask[group], answer_mask], 1)
    return Rollout(sequences, attention_mask, prompts.shape[1], answer_mask,
                   answer_mask[:, -1] == 0)  # fmt: skip


def _whole_rows(model, rollout):
    """The model's own output over the whole rows, positions counted from each first token."""
    positions = (rollout.attention_mask.cumsum(1) - 1).clamp_min(0)
    return model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                 position_ids=positions)  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [dict(activation_function="gelu_new"),
     dict(activation_function="gelu", scale_attn_by_inverse_layer_idx=True)],
)  # fmt: skip
def test_cached_logits_equal_the_full_forward(config):
    """Prefill then one token at a time: each step's logits are those of Hugging Face's forward
    over the whole left-padded sequence at the same positions."""
    model = _gpt2(**config)
    ids, mask = _left_padded_prompts()
    more = torch.randint(4, 20, (ids.shape[0], 5))
    full_ids = torch.cat([ids, more], 1)
    full_mask = torch.cat([mask, torch.ones_like(more)], 1)
    positions = (full_mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions)
    decoder = GPT2Decoder(model, ids.shape[0], full_ids.shape[1])
    key_mask = full_mask.bool()
    p = ids.shape[1]
    with torch.no_grad():
        got = [decoder(ids, positions[:, :p], key_mask)]
        for t in range(more.shape[1] - 1):
            got.append(decoder(more[:, t : t + 1], positions[:, p + t : p + t + 1], key_mask))
    torch.testing.assert_close(
        torch.stack(got, 1), expected.logits[:, p - 1 : -1], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 0), (1.5, 4)])
def test_the_same_tokens_as_generate(temperature, top_k):
    """With the same seed the loop draws what `generate` draws: suppressed tokens, temperature,
    top-k, one draw per row, padding after the end token, stopping when all rows ended."""
    model = _gpt2(activation_function="gelu")
    ids, mask = _left_padded_prompts()
    suppressed = (0, 1, PAD)
    ended_early = 0
    for seed in range(4):
        torch.manual_seed(seed)
        reference = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
            top_k=top_k or None, top_p=None, max_new_tokens=12, eos_token_id=EOS,
            pad_token_id=PAD, suppress_tokens=list(suppressed),
        )[:, ids.shape[1] :]  # fmt: skip
        torch.manual_seed(seed)
        tokens = sample_tokens(
            model, ids, mask, 12, temperature=temperature, top_k=top_k, suppressed=suppressed,
            eos_token_id=EOS, pad_token_id=PAD,
        )  # fmt: skip
        assert tokens is not None
        assert torch.equal(tokens, reference)
        assert not torch.isin(tokens, torch.tensor((0, 1))).any()
        ended_early += int(((tokens == PAD).any(1)).sum())
    assert ended_early > 0  # the padding after an end token was exercised


def test_other_models_fall_back_to_generate():
    ids, mask = _left_padded_prompts()
    options = dict(temperature=1.0, top_k=0, suppressed=(), eos_token_id=EOS, pad_token_id=PAD)
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )  # fmt: skip
    ).eval()  # an architecture with no lean decoder (Llama's: tests/test_decoding_llama.py)
    assert sample_tokens(neox, ids, mask, 4, **options) is None
    dropout = _gpt2(resid_pdrop=0.1).train()  # sampling would apply dropout, as generate does
    assert sample_tokens(dropout, ids, mask, 4, **options) is None
    assert sample_tokens(dropout.eval(), ids, mask, 4, **options) is not None
    too_long = _gpt2(n_positions=ids.shape[1] + 3)
    assert sample_tokens(too_long, ids, mask, 4, **options) is None


def test_shared_prompts_give_each_rows_own_logits_and_gradients():
    """Answers to repeated prompts (GRPO's groups) run each prompt once: the answer positions'
    logits, values and the gradients of a loss on them equal those of the whole rows."""
    from selfsup.lm.alignment.rollout import Rollout, forward_response

    model = _gpt2(activation_function="gelu_new")
    prompts, prompt_mask = _left_padded_prompts()
    group = torch.tensor([0, 0, 0, 2, 2, 5, 2, 0])  # rows of repeated prompts, out of order
    torch.manual_seed(2)
    answers = torch.randint(4, 20, (len(group), 6))
    answer_mask = torch.ones_like(answers)
    answer_mask[1, 3:] = 0  # ended early: right padding
    answer_mask[6, 1:] = 0
    rollout = _rollout(prompts, prompt_mask, group, answers, answer_mask)
    sequences, attention_mask = rollout.sequences, rollout.attention_mask
    value_head = torch.nn.Linear(24, 1)
    real = answer_mask.bool()
    results = []
    for distinct in (False, True):
        model.zero_grad()
        r = rollout
        if distinct:  # the same rows, each prompt made unique by a masked-out first column
            extra = torch.arange(len(group))[:, None]
            r = Rollout(torch.cat([extra, sequences], 1),
                        torch.cat([torch.zeros_like(extra), attention_mask], 1),
                        prompts.shape[1] + 1, answer_mask, rollout.ended)  # fmt: skip
        logits, logprobs, values = forward_response(model, r, value_head)
        (logprobs[real].sum() + values[real].sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((logits[real], logprobs[real], values[real], grads))
    (l1, p1, v1, g1), (l2, p2, v2, g2) = results
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p1, p2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_dpo_pairs_run_their_shared_prompt_once():
    """DPO's log-probabilities with each pair's prompt run once equal those of the two whole
    rows, values and gradients: answers that begin alike, a labelled earlier turn, truncation."""
    from selfsup.lm.alignment.dpo import pair_batch, pair_logprobs, sequence_logprobs

    model = _gpt2(activation_function="gelu")
    ignore = -100

    def conversation(prompt, answer, earlier=()):
        ids = [*earlier, *prompt, *answer]
        labels = [*earlier, *[ignore] * len(prompt), *answer]  # earlier turns labelled, too
        return ids, [ignore, *labels[1:]]

    examples = [
        (conversation([5, 6, 7], [8, 9, 3]), conversation([5, 6, 7], [8, 10, 11, 3])),
        (conversation([5, 12], [13, 3]), conversation([5, 12], [14, 15, 16, 17, 3])),
        (conversation([4, 6, 6, 6], [3]), conversation([4, 6, 6, 6], [19, 3])),
        (conversation([5, 9], [10, 3], earlier=[4, 11]), conversation([5, 9], [12, 3], [4, 11])),
    ]
    results = []
    for shared in (True, False):
        model.zero_grad()
        if shared:
            logps = pair_logprobs(model, examples, PAD, "cpu")
        else:
            logps = sequence_logprobs(model, pair_batch(examples, PAD, "cpu"))
        (logps * torch.arange(1.0, 9.0)).sum().backward()
        results.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
    (shared_logps, shared_grads), (plain_logps, plain_grads) = results
    torch.testing.assert_close(shared_logps, plain_logps, atol=1e-5, rtol=1e-5)
    for a, b in zip(shared_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_dpo_reference_scores_each_conversation_once_and_right():
    """A ranking's pairs repeat its answers; the reference's log-probabilities, computed once
    per distinct conversation, are each row's own (checked row by row, one at a time)."""
    from selfsup.lm.alignment.dpo import _with_reference, pair_batch, sequence_logprobs

    model = _gpt2(activation_function="gelu")
    ignore = -100
    answers = {a: ([5, 6, 7, *a], [ignore] * 3 + list(a)) for a in [(8, 3), (9, 10, 3), (11, 3)]}
    a, b, c = answers.values()
    examples = [(a, b), (a, c), (b, c), (c, a)]
    scored = _with_reference(model, examples, PAD, batch_size=2)
    with torch.no_grad():
        for (chosen, rejected, ref_c, ref_r), (x, y) in zip(scored, examples, strict=True):
            assert chosen is x and rejected is y
            expected = sequence_logprobs(model, pair_batch([(x, y)], PAD, "cpu"))
            torch.testing.assert_close(torch.tensor([ref_c, ref_r]), expected, atol=1e-5, rtol=0)


def test_reference_logits_by_the_lean_forward():
    """Without gradients (a reference model) the answers' logits come from the lean GPT-2
    forward: equal to Hugging Face's whole-row forward, repeated prompts or not."""
    from selfsup.lm.alignment.rollout import forward_response

    model = _gpt2(activation_function="gelu_new")
    prompts, prompt_mask = _left_padded_prompts()
    torch.manual_seed(3)
    for group in (torch.tensor([0, 0, 3, 3, 3, 1]), torch.arange(6)):
        answers = torch.randint(4, 20, (len(group), 5))
        answer_mask = torch.ones_like(answers)
        answer_mask[2, 2:] = 0
        rollout = _rollout(prompts, prompt_mask, group, answers, answer_mask)
        with torch.no_grad():
            logits, _, _ = forward_response(model, rollout)
            whole = _whole_rows(model, rollout).logits[:, prompts.shape[1] - 1 : -1]
        real = answer_mask.bool()
        torch.testing.assert_close(logits[real], whole[real], atol=1e-5, rtol=1e-5)


def test_shared_prompts_on_another_architecture():
    """The shared-prompt forward is Hugging Face's own cache (not the GPT-2 code): on a Llama,
    repeated prompts give the whole rows' answer logits, with and without gradients."""
    from selfsup.lm.alignment.rollout import forward_response

    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            pad_token_id=PAD,
        )  # fmt: skip
    ).eval()
    prompts, prompt_mask = _left_padded_prompts()
    group = torch.tensor([1, 1, 4, 4, 4, 0])
    answers = torch.randint(4, 20, (len(group), 4))
    answer_mask = torch.ones_like(answers)
    answer_mask[0, 2:] = 0
    rollout = _rollout(prompts, prompt_mask, group, answers, answer_mask)
    real = answer_mask.bool()
    expected = _whole_rows(llama, rollout).logits[:, prompts.shape[1] - 1 : -1][real].detach()
    logits, _, _ = forward_response(llama, rollout)
    torch.testing.assert_close(logits[real].detach(), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        logits, _, _ = forward_response(llama, rollout)
    torch.testing.assert_close(logits[real], expected, atol=1e-5, rtol=1e-5)


def test_reward_scores_by_the_lean_forward():
    """A GPT-2 reward model's scores, read at each row's last real token, equal Hugging Face's
    `GPT2ForSequenceClassification` on left-padded prompts and right-padded answers."""
    from transformers import GPT2ForSequenceClassification

    from selfsup.lm.alignment.rollout import reward_scores

    torch.manual_seed(4)
    config = GPT2Config(vocab_size=VOCAB, n_positions=48, n_embd=24, n_layer=2, n_head=3,
                        num_labels=1, pad_token_id=PAD)  # fmt: skip
    reward_model = GPT2ForSequenceClassification(config).eval()
    prompts, prompt_mask = _left_padded_prompts()
    answers = torch.randint(4, 20, (len(prompts), 5))
    answer_mask = torch.ones_like(answers)
    answer_mask[1, 2:] = 0
    answer_mask[4, 4:] = 0
    answers[answer_mask == 0] = PAD
    rollout = _rollout(prompts, prompt_mask, torch.arange(len(prompts)), answers, answer_mask)
    with torch.no_grad():
        expected = _whole_rows(reward_model, rollout).logits[:, 0]
    scores = reward_scores(reward_model, rollout)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores.std() > 1e-3  # rows differ: reading the wrong token would show
