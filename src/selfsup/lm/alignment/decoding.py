"""A lean sampling loop for GPT-2 policies, token for token what `generate` samples.

PPO, GRPO and best-of-n spend most of their time sampling short answers from small models.
There, `transformers`' `generate` spends most of each decoding step in per-step Python (its
model forward's mask building, cache objects and output classes, its logits processors); this
loop takes about a third of its time (benchmarks/sampling_speed.py). It runs the same GPT-2
maths on the model's own weights with a preallocated key/value cache and applies the same
processing in the same order (suppressed tokens, temperature, top-k, softmax, one multinomial
draw per row of the whole batch, padding after the end token), so with the same seed it draws
the same tokens (a test compares the two).
Other architectures, dropout in training mode, or answers that would run past the model's
positions return None, and the caller uses `generate`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN


def position_ids(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... from each row's first real token (what `generate` uses with left padding)."""
    return (attention_mask.long().cumsum(1) - 1).clamp_min(0)


def continuation_positions(prefix_mask: Tensor, rows: Tensor, length: int) -> Tensor:
    """Positions of `length` tokens that follow prefix `rows[r]` in row r (R×length)."""
    steps = torch.arange(length, device=prefix_mask.device)
    return prefix_mask.sum(1)[rows, None] + steps


class GPT2Decoder:
    """Incremental forward of a Hugging Face `GPT2LMHeadModel`: feed tokens, get the last
    position's logits; keys and values of every fed position stay in a preallocated cache."""

    def __init__(self, model: nn.Module, batch: int, max_length: int) -> None:
        config = model.config
        self.transformer, self.lm_head = model.transformer, getattr(model, "lm_head", None)
        self.heads, self.width = config.n_head, config.n_embd
        self.eps = config.layer_norm_epsilon
        self.act = ACT2FN[config.activation_function]
        head_dim = self.width // self.heads
        base = head_dim**-0.5 if config.scale_attn_weights else 1.0
        inverse_layer = config.scale_attn_by_inverse_layer_idx
        self.scales = [base / (i + 1) if inverse_layer else base for i in range(config.n_layer)]
        self.layers = [  # the weights, looked up once (the optimiser updates them in place)
            (b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias,
             b.attn.c_proj.weight, b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
             b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias)
            for b in self.transformer.h
        ]  # fmt: skip
        weight = self.transformer.wte.weight
        shape = (config.n_layer, batch, self.heads, max_length, head_dim)
        self.keys = torch.empty(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    @staticmethod
    def supports(model: nn.Module, max_length: int) -> bool:
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != "gpt2" or not hasattr(model, "transformer"):
            return False
        if not (hasattr(model, "lm_head") or hasattr(model, "score")):  # an LM or a reward model
            return False
        dropout = (config.attn_pdrop, config.resid_pdrop, config.embd_pdrop)
        return (
            not config.add_cross_attention
            and not config.reorder_and_upcast_attn
            and config.activation_function in ACT2FN
            and max_length <= config.n_positions
            and not (model.training and any(p > 0 for p in dropout))
        )

    def __call__(self, ids: Tensor, positions: Tensor, key_mask: Tensor) -> Tensor:
        """Logits (B×V) after `ids` (B×S) at `positions`; `key_mask` (B×max_length) marks the
        cached and new positions that may be attended to (False on left padding)."""
        return self.logits(self.hidden(ids, positions, key_mask)[:, -1])

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.final(hidden))

    def final(self, hidden: Tensor) -> Tensor:
        t = self.transformer
        return F.layer_norm(hidden, (self.width,), t.ln_f.weight, t.ln_f.bias, self.eps)

    def hidden(self, ids: Tensor, positions: Tensor, key_mask: Tensor) -> Tensor:
        """The last block's output (B×S×E, before the final layer norm) at every new position;
        their keys and values join the cache."""
        t, (b, s) = self.transformer, ids.shape
        start, end = self.length, self.length + ids.shape[1]
        x = t.wte(ids) + t.wpe(positions)
        mask = key_mask[:, None, None, :end]
        if s > 1:
            causal = torch.ones(s, end, dtype=torch.bool, device=ids.device).tril(start)
            mask = mask & causal
        if start == 0:  # a padding query sees itself only: finite, and no real query sees it
            mask = mask | torch.eye(s, dtype=torch.bool, device=ids.device)
        for i, weights in enumerate(self.layers):
            ln1_w, ln1_b, qkv_w, qkv_b, out_w, out_b, ln2_w, ln2_b, fc_w, fc_b, proj_w, proj_b = (
                weights
            )
            h = F.layer_norm(x, (self.width,), ln1_w, ln1_b, self.eps)
            qkv = _linear(h, qkv_w, qkv_b).view(b, s, 3, self.heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            self.keys[i, :, :, start:end] = k
            self.values[i, :, :, start:end] = v
            a = F.scaled_dot_product_attention(
                q, self.keys[i, :, :, :end], self.values[i, :, :, :end], mask, scale=self.scales[i]
            )
            x = x + _linear(a.transpose(1, 2).reshape(b, s, self.width), out_w, out_b)
            h = F.layer_norm(x, (self.width,), ln2_w, ln2_b, self.eps)
            x = x + _linear(self.act(_linear(h, fc_w, fc_b)), proj_w, proj_b)
        self.length = end
        return x

    def follow(self, prefix: GPT2Decoder, rows: Tensor) -> None:
        """Start from `prefix`'s cache, its row `rows[r]` as row r."""
        self.keys[:, :, :, : prefix.length] = prefix.keys[:, rows, :, : prefix.length]
        self.values[:, :, :, : prefix.length] = prefix.values[:, rows, :, : prefix.length]
        self.length = prefix.length


Fed = tuple[Tensor, Tensor, Tensor]  # (ids, positions, key mask): what `GPT2Decoder.hidden` takes


@torch.no_grad()
def continuation_logits(model: nn.Module, prefix: Fed, rows: Tensor, rest: Fed) -> Tensor | None:
    """`rollout.continuation_outputs`' logits without gradients (a reference model's), by the
    lean GPT-2 forward; None where it does not apply. `prefix`: the U left-padded prefixes;
    `rest`: every continuation but its last token (R rows, row r after prefix `rows[r]`), its
    key mask covering prefix and continuation."""
    (u, p), (r, c) = prefix[0].shape, rest[0].shape
    if not GPT2Decoder.supports(model, p + c + 1):
        return None
    ids, positions, mask = prefix
    decoder = GPT2Decoder(model, u, p)
    last = decoder.hidden(ids, positions, mask.bool())[rows, -1:]
    if c == 0:
        return decoder.logits(last)
    prefix_decoder, decoder = decoder, GPT2Decoder(model, r, p + c)
    decoder.follow(prefix_decoder, rows)
    ids, positions, mask = rest
    return decoder.logits(torch.cat([last, decoder.hidden(ids, positions, mask.bool())], 1))


@torch.no_grad()
def sequence_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
    """A GPT-2 reward model's (`GPT2ForSequenceClassification`) scores, B×labels, read where
    Hugging Face reads them (the rightmost token that is not padding), by the lean forward;
    None where it does not apply."""
    if not hasattr(model, "score") or not GPT2Decoder.supports(model, input_ids.shape[1]):
        return None
    decoder = GPT2Decoder(model, *input_ids.shape)
    hidden = decoder.hidden(input_ids, position_ids(attention_mask), attention_mask.bool())
    pad = model.config.pad_token_id
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (columns * (input_ids != pad)).argmax(-1) if pad is not None else columns[-1:]
    rows = torch.arange(len(input_ids), device=input_ids.device)
    return model.score(decoder.final(hidden[rows, last]))


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """GPT-2's Conv1D (a linear layer with its weight stored in×out), as it computes it."""
    out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
    return out.view(*x.shape[:-1], -1)


@torch.no_grad()
def sample_tokens(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int,
    suppressed: tuple[int, ...],
    eos_token_id: int,
    pad_token_id: int,
) -> Tensor | None:
    """B×T sampled answer tokens after left-padded prompts (T ≤ max_new_tokens: the loop stops
    when every row has its end token; rows that ended are padded), or None where
    `GPT2Decoder` does not apply."""
    batch, prompt_length = input_ids.shape
    if not GPT2Decoder.supports(model, prompt_length + max_new_tokens):
        return None
    decoder = GPT2Decoder(model, batch, prompt_length + max_new_tokens)
    key_mask = torch.ones(batch, prompt_length + max_new_tokens, dtype=torch.bool,
                          device=input_ids.device)  # fmt: skip
    key_mask[:, :prompt_length] = attention_mask.bool()
    positions = position_ids(attention_mask)
    logits = decoder(input_ids, positions, key_mask)
    position = positions[:, -1:] + 1
    blocked = torch.tensor(suppressed, dtype=torch.long, device=input_ids.device)
    tokens = torch.full((batch, max_new_tokens), pad_token_id, device=input_ids.device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        scores = logits.float()
        if len(suppressed):
            scores = scores.index_fill(-1, blocked, -float("inf"))
        if temperature != 1.0:
            scores = scores / temperature
        if top_k:
            kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1:]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        drawn = torch.multinomial(scores.softmax(-1), 1).squeeze(1)
        tokens[:, step] = torch.where(unfinished, drawn, pad_token_id)
        unfinished &= tokens[:, step] != eos_token_id
        if not unfinished.any() or step + 1 == max_new_tokens:
            return tokens[:, : step + 1]
        logits = decoder(tokens[:, step : step + 1], position, key_mask)
        position = position + 1
    return tokens[:, :0]
