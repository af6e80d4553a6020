"""Lean sampling loops for GPT-2 and Llama-family policies, token for token what `generate`
samples.

PPO, GRPO and best-of-n spend most of their time sampling short answers from small models.
There, `transformers`' `generate` spends most of each decoding step in per-step Python (its
model forward's mask building, cache objects and output classes, its logits processors); these
loops take a fraction of its time (benchmarks/sampling_speed.py). They run the model's own maths
on its own weights with a preallocated key/value cache and apply the same processing in the
same order (suppressed tokens, temperature, top-k, softmax, one multinomial draw per row of the
whole batch, padding after the end token), so with the same seed they draw the same tokens
(tests/test_decoding*.py compare the two). `decoder_class` picks the loop: `GPT2Decoder` for
GPT-2, `LlamaDecoder` for Llama, Qwen2 and Mistral (RoPE, grouped-query attention, RMSNorm,
SwiGLU). A peft LoRA model is served through its base model: each LoRA layer (and a trainable-
tokens embedding or head) becomes one plain layer of the weights it computes with, W + (B@A)·scale
as peft's merge adds them, made once per decoder (a sampling round) instead of per token; the
base weights are not touched. A `lora.Reference` (the base with its adapters off) is read inside
one `disable_adapter()` for the whole call. Layers of other kinds are called as they are. Other
architectures and peft methods, rotary scalings that change with the length, sliding windows
shorter than the answer, dropout in training mode, or answers that would run past GPT-2's
positions return None, and the caller uses `generate`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from selfsup.lm.models.lora import Reference


def position_ids(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... from each row's first real token (what `generate` uses with left padding)."""
    return (attention_mask.long().cumsum(1) - 1).clamp_min(0)


def continuation_positions(prefix_mask: Tensor, rows: Tensor, length: int) -> Tensor:
    """Positions of `length` tokens that follow prefix `rows[r]` in row r (R×length)."""
    steps = torch.arange(length, device=prefix_mask.device)
    return prefix_mask.sum(1)[rows, None] + steps


def unwrap(model: nn.Module) -> nn.Module | None:
    """The transformers model that computes `model`'s outputs: `model` itself, or a peft LoRA
    model's base (LoRA replaces layers, which the decoders call as modules: exact); None for
    other peft methods (prompt tuning and the like change the forward itself)."""
    if not type(model).__module__.startswith("peft."):
        return model
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "peft_type", None) != "LORA" or getattr(config, "is_prompt_learning", 1):
        return None
    return model.get_base_model()


def _dropout_active(model: nn.Module) -> bool:
    """Training mode with a dropout that would apply (LoRA's, say): sampling must use it."""
    return model.training and any(
        isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in model.modules()
    )


@contextmanager
def _served(model: nn.Module) -> Iterator[nn.Module]:
    """`model` as the decoders read it: a `lora.Reference` is its peft model inside one
    `disable_adapter()` for the whole call (not one per forward), anything else itself."""
    if isinstance(model, Reference):
        with model.mode():
            yield model.model
    else:
        yield model


def _plain(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module))


def _is_peft(module: nn.Module, name: str) -> bool:
    return type(module).__module__.startswith("peft.") and type(module).__name__ == name


def _linear(layer: nn.Module, weight: Tensor) -> Callable[[Tensor], Tensor] | None:
    """A plain `Linear` or GPT-2 `Conv1D` as a function, with `weight` (its own or merged)."""
    if _plain(layer) and type(layer) is nn.Linear:
        return partial(F.linear, weight=weight, bias=layer.bias)
    if _plain(layer) and type(layer) is Conv1D:
        return partial(_conv1d, weight=weight, bias=layer.bias)
    return None


def _merged_lora(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """A peft LoRA `Linear` over a plain layer (vanilla LoRA: no DoRA or other variant, no LoRA
    bias) as that layer with the weight it computes with: the base's when its adapters are off,
    else W + each active adapter's `get_delta_weight` (what peft's merge adds); None otherwise."""
    if not (_is_peft(module, "Linear") and hasattr(module, "get_delta_weight")):
        return None
    base: nn.Module = module.base_layer  # type: ignore[assignment]
    if module.merged:  # peft unmerges it in its forward when the adapters are off
        return None
    weight = base.weight
    if not module.disable_adapters:
        for name in [a for a in module.active_adapters if a in module.lora_A]:
            if name in getattr(module, "lora_variant", {}) or module.lora_bias[name]:
                return None
            weight = weight + module.get_delta_weight(name)
    return _linear(base, weight)  # type: ignore[arg-type]


def _merged_tokens(module: nn.Module) -> tuple[nn.Module, Tensor] | None:
    """(base layer, the weight it computes with) of peft's trainable-tokens wrapper (new rows of an
    embedding or a tied head), or None."""
    if not _is_peft(module, "TrainableTokensWrapper"):
        return None
    layer = module.token_adapter
    base, active = layer.base_layer, layer.active_adapters
    if layer.merged or not _plain(base):
        return None
    wrapped = module.active_adapters
    on = not (module.disable_adapters or layer.disable_adapters) and bool(active and wrapped)
    on = on and all(a in getattr(module, "_adapters", ()) for a in wrapped)  # as its forward
    return base, layer.get_merged_weights(active) if on else base.weight


def _projection(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """`module`'s forward: a plain `Linear` or GPT-2 `Conv1D` by its weights (no module call), a
    LoRA layer or trainable-tokens head by its merged weights, anything else (a quantised layer,
    a module with hooks) called as it is."""
    tokens = _merged_tokens(module)
    if tokens is not None and type(tokens[0]) is nn.Linear:
        return partial(F.linear, weight=tokens[1], bias=tokens[0].bias)
    own = _linear(module, module.weight) if hasattr(module, "weight") else None
    return own or _merged_lora(module) or module


def _embedding(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """An input embedding's forward: a trainable-tokens one by its merged rows, else the module."""
    tokens = _merged_tokens(module)
    if tokens is not None and type(tokens[0]) is nn.Embedding and tokens[0].max_norm is None:
        return partial(F.embedding, weight=tokens[1], padding_idx=tokens[0].padding_idx)
    return module


def _conv1d(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """GPT-2's Conv1D (a linear layer with its weight stored in×out), as it computes it."""
    out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
    return out.view(*x.shape[:-1], -1)


def _attention_mask(key_mask: Tensor, start: int, s: int) -> Tensor:
    """B×1×s×end: the cached and new keys that each of `s` new queries (from cache position
    `start`) may see; a padding query sees itself only (finite, and no real query sees it)."""
    end = start + s
    mask = key_mask[:, None, None, :end]
    if s > 1:
        causal = torch.ones(s, end, dtype=torch.bool, device=key_mask.device).tril(start)
        mask = mask & causal
    if start == 0:
        mask = mask | torch.eye(s, dtype=torch.bool, device=key_mask.device)
    return mask


class CachedDecoder:
    """Incremental forward of a causal LM: feed tokens, get the last position's logits; keys and
    values of every fed position stay in a preallocated cache (layers×B×heads×length×dim).
    Subclasses give `hidden`, `final` and the cache."""

    keys: Tensor
    values: Tensor
    length: int
    lm_head: Callable[[Tensor], Tensor] | None

    @staticmethod
    def supports(model: nn.Module, max_length: int) -> bool:
        raise NotImplementedError

    def __call__(self, ids: Tensor, positions: Tensor, key_mask: Tensor) -> Tensor:
        """Logits (B×V) after `ids` (B×S) at `positions`; `key_mask` (B×max_length) marks the
        cached and new positions that may be attended to (False on left padding)."""
        return self.logits(self.hidden(ids, positions, key_mask)[:, -1])

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.final(hidden))  # type: ignore[misc]

    def final(self, hidden: Tensor) -> Tensor:
        raise NotImplementedError

    def hidden(self, ids: Tensor, positions: Tensor, key_mask: Tensor) -> Tensor:
        """The last block's output (B×S×E, before the final norm) at every new position; their
        keys and values join the cache."""
        raise NotImplementedError

    def sharing(self, batch: int, max_length: int) -> CachedDecoder:
        """A decoder of the same weights (merged LoRA layers made once) with its own empty cache."""
        other = copy.copy(self)
        layers, _, heads, _, dim = self.keys.shape
        other._cache(layers, batch, heads, max_length, dim, self.keys)
        return other

    def follow(self, prefix: CachedDecoder, rows: Tensor) -> None:
        """Start from `prefix`'s cache, its row `rows[r]` as row r."""
        self.keys[:, :, :, : prefix.length] = prefix.keys[:, rows, :, : prefix.length]
        self.values[:, :, :, : prefix.length] = prefix.values[:, rows, :, : prefix.length]
        self.length = prefix.length

    def _cache(self, layers: int, batch: int, heads: int, max_length: int, dim: int,
               like: Tensor) -> None:  # fmt: skip
        shape = (layers, batch, heads, max_length, dim)
        self.keys = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.values = torch.empty_like(self.keys)
        self.length = 0


class GPT2Decoder(CachedDecoder):
    """A Hugging Face `GPT2LMHeadModel` (or `GPT2ForSequenceClassification`)."""

    def __init__(self, model: nn.Module, batch: int, max_length: int) -> None:
        model = unwrap(model)  # type: ignore[assignment]
        config = model.config
        self.heads, self.width = config.n_head, config.n_embd
        self.transformer = model.transformer
        self.wte, self.lm_head = _embedding(self.transformer.wte), _head(model)  # merged once
        self.eps = config.layer_norm_epsilon
        self.act = ACT2FN[config.activation_function]
        head_dim = self.width // self.heads
        base = head_dim**-0.5 if config.scale_attn_weights else 1.0
        inverse_layer = config.scale_attn_by_inverse_layer_idx
        self.scales = [base / (i + 1) if inverse_layer else base for i in range(config.n_layer)]
        self.layers = [  # looked up once (the optimiser updates the weights in place)
            (b.ln_1.weight, b.ln_1.bias, _projection(b.attn.c_attn), _projection(b.attn.c_proj),
             b.ln_2.weight, b.ln_2.bias, _projection(b.mlp.c_fc), _projection(b.mlp.c_proj))
            for b in self.transformer.h
        ]  # fmt: skip
        self._cache(config.n_layer, batch, self.heads, max_length, head_dim,
                    self.transformer.wte.weight)  # fmt: skip

    @staticmethod
    def supports(model: nn.Module, max_length: int) -> bool:
        model = unwrap(model)  # type: ignore[assignment]
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
            and not _dropout_active(model)
        )

    def final(self, hidden: Tensor) -> Tensor:
        t = self.transformer
        return F.layer_norm(hidden, (self.width,), t.ln_f.weight, t.ln_f.bias, self.eps)

    def hidden(self, ids: Tensor, positions: Tensor, key_mask: Tensor) -> Tensor:
        t, (b, s) = self.transformer, ids.shape
        start, end = self.length, self.length + s
        x = self.wte(ids) + t.wpe(positions)
        mask = _attention_mask(key_mask, start, s)
        for i, (ln1_w, ln1_b, qkv, out, ln2_w, ln2_b, fc, proj) in enumerate(self.layers):
            h = F.layer_norm(x, (self.width,), ln1_w, ln1_b, self.eps)
            q, k, v = qkv(h).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            self.keys[i, :, :, start:end] = k
            self.values[i, :, :, start:end] = v
            a = F.scaled_dot_product_attention(
                q, self.keys[i, :, :, :end], self.values[i, :, :, :end], mask, scale=self.scales[i]
            )
            x = x + out(a.transpose(1, 2).reshape(b, s, self.width))
            h = F.layer_norm(x, (self.width,), ln2_w, ln2_b, self.eps)
            x = x + proj(self.act(fc(h)))
        self.length = end
        return x


class LlamaDecoder(CachedDecoder):
    """A Hugging Face Llama, Qwen2 or Mistral causal LM (or its `...ForSequenceClassification`):
    rotary positions (the model's own frequencies and scale: default, linear, llama3 or yarn),
    grouped-query attention, RMSNorm, a gated MLP, biases where the layers have them, a tied or
    untied head."""

    TYPES = ("llama", "qwen2", "mistral")
    ROPE = ("default", "linear", "llama3", "yarn")  # frequencies fixed when the model is built

    def __init__(self, model: nn.Module, batch: int, max_length: int) -> None:
        model = unwrap(model)  # type: ignore[assignment]
        config = model.config
        self.body, self.lm_head = model.model, _head(model)  # merged once
        self.embed = _embedding(self.body.embed_tokens)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        rope = self.body.rotary_emb
        self.inv_freq, self.rope_scale = rope.inv_freq.float(), rope.attention_scaling
        blocks = self.body.layers[: config.num_hidden_layers]
        self.layers = [  # looked up once (the optimiser updates the weights in place)
            (_norm(b.input_layernorm), b.self_attn.scaling,
             *map(_projection, (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj,
                                b.self_attn.o_proj)),
             _norm(b.post_attention_layernorm), b.mlp.act_fn,
             *map(_projection, (b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj)))
            for b in blocks
        ]  # fmt: skip
        self.norm = _norm(self.body.norm)
        self._cache(len(blocks), batch, self.kv_heads, max_length, self.head_dim,
                    self.body.embed_tokens.weight)  # fmt: skip

    @staticmethod
    def supports(model: nn.Module, max_length: int) -> bool:
        model = unwrap(model)  # type: ignore[assignment]
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in LlamaDecoder.TYPES:
            return False
        body = getattr(model, "model", None)
        if not (hasattr(model, "lm_head") or hasattr(model, "score")) or body is None:
            return False
        window = getattr(config, "sliding_window", None)  # Qwen2 sets it only when it is used
        rope = getattr(getattr(body, "rotary_emb", None), "rope_type", None)
        return (
            rope in LlamaDecoder.ROPE
            and (window is None or max_length <= window)
            and not (model.training and getattr(config, "attention_dropout", 0.0) > 0)
            and not _dropout_active(model)
        )

    def final(self, hidden: Tensor) -> Tensor:
        return _rms_norm(hidden, *self.norm)

    def hidden(self, ids: Tensor, positions: Tensor, key_mask: Tensor) -> Tensor:
        (b, s), d = ids.shape, self.head_dim
        start, end = self.length, self.length + s
        x = self.embed(ids)
        freqs = positions[..., None].float() * self.inv_freq.to(x.device)
        angles = torch.cat((freqs, freqs), -1)[:, :, None]  # B×S×1×D
        cos = (angles.cos() * self.rope_scale).to(x.dtype)
        sin = (angles.sin() * self.rope_scale).to(x.dtype)
        mask = _attention_mask(key_mask, start, s)
        group = self.heads // self.kv_heads
        for i, (
            norm1,
            scale,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            norm2,
            act,
            gate,
            up,
            down,
        ) in enumerate(self.layers):
            h = _rms_norm(x, *norm1)
            q = _rotate(q_proj(h).view(b, s, self.heads, d), cos, sin).transpose(1, 2)
            k = _rotate(k_proj(h).view(b, s, self.kv_heads, d), cos, sin).transpose(1, 2)
            self.keys[i, :, :, start:end] = k
            self.values[i, :, :, start:end] = v_proj(h).view(b, s, self.kv_heads, d).transpose(1, 2)
            keys, values = self.keys[i, :, :, :end], self.values[i, :, :, :end]
            if group > 1 and s == 1:  # as transformers: each key head's queries side by side
                q = q.reshape(b, self.kv_heads, group, d)
            elif group > 1:
                keys, values = _repeat_heads(keys, group), _repeat_heads(values, group)
            a = F.scaled_dot_product_attention(q, keys, values, mask, scale=scale)
            x = x + o_proj(a.reshape(b, self.heads, s, d).transpose(1, 2).reshape(b, s, -1))
            h = _rms_norm(x, *norm2)
            x = x + down(act(gate(h)) * up(h))
        self.length = end
        return x


def _head(model: nn.Module) -> Callable[[Tensor], Tensor] | None:
    head = getattr(model, "lm_head", None)
    return None if head is None else _projection(head)


def _norm(module: nn.Module) -> tuple[Tensor, float]:
    return module.weight, module.variance_epsilon


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm, in float32 as it computes it."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x (B×S×heads×D), the halves rotated as Hugging Face does."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def _repeat_heads(x: Tensor, group: int) -> Tensor:
    """B×kv×L×D -> B×(kv·group)×L×D, each key head repeated for its group of query heads."""
    b, kv, length, d = x.shape
    return x[:, :, None].expand(b, kv, group, length, d).reshape(b, kv * group, length, d)


DECODERS: tuple[type[CachedDecoder], ...] = (GPT2Decoder, LlamaDecoder)


def decoder_class(model: nn.Module, max_length: int) -> type[CachedDecoder] | None:
    """The lean decoder that serves `model` exactly for `max_length` positions, or None."""
    return next((d for d in DECODERS if d.supports(model, max_length)), None)


Fed = tuple[Tensor, Tensor, Tensor]  # (ids, positions, key mask): what `hidden` takes


@torch.no_grad()
def continuation_logits(model: nn.Module, prefix: Fed, rows: Tensor, rest: Fed) -> Tensor | None:
    """`rollout.continuation_outputs`' logits without gradients (a reference model's), by the
    lean GPT-2 forward; None where it does not apply. `prefix`: the U left-padded prefixes;
    `rest`: every continuation but its last token (R rows, row r after prefix `rows[r]`), its
    key mask covering prefix and continuation."""
    (u, p), (r, c) = prefix[0].shape, rest[0].shape
    with _served(model) as model:
        decoder_type = decoder_class(model, p + c + 1)
        if decoder_type is None:
            return None
        ids, positions, mask = prefix
        decoder = decoder_type(model, u, p)
        last = decoder.hidden(ids, positions, mask.bool())[rows, -1:]
        if c == 0:
            return decoder.logits(last)
        prefix_decoder, decoder = decoder, decoder.sharing(r, p + c)
        decoder.follow(prefix_decoder, rows)
        ids, positions, mask = rest
        return decoder.logits(torch.cat([last, decoder.hidden(ids, positions, mask.bool())], 1))


@torch.no_grad()
def sequence_scores(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, last: Tensor | None = None
) -> Tensor | None:
    """A reward model's (`GPT2ForSequenceClassification`, `LlamaForSequenceClassification`,
    ...) scores, B×labels, read at column `last[b]` of each row (default: where Hugging Face
    reads them, the rightmost token that is not padding), by a lean decoder; None where none
    applies."""
    with _served(model) as model:
        base, decoder_type = unwrap(model), decoder_class(model, input_ids.shape[1])
        if not hasattr(base, "score") or decoder_type is None:
            return None
        decoder = decoder_type(model, *input_ids.shape)
        hidden = decoder.hidden(input_ids, position_ids(attention_mask), attention_mask.bool())
        if last is None:
            pad = base.config.pad_token_id  # type: ignore[union-attr]
            columns = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (columns * (input_ids != pad)).argmax(-1) if pad is not None else columns[-1:]
        rows = torch.arange(len(input_ids), device=input_ids.device)
        return base.score(decoder.final(hidden[rows, last]))  # type: ignore[union-attr]


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
    no lean decoder applies."""
    with _served(model) as model:
        decoder_type = decoder_class(model, input_ids.shape[1] + max_new_tokens)
        if decoder_type is None:
            return None
        decoder = decoder_type(model, len(input_ids), input_ids.shape[1] + max_new_tokens)
        return _sample(decoder, input_ids, attention_mask, max_new_tokens, temperature, top_k,
                       suppressed, eos_token_id, pad_token_id)  # fmt: skip


def _sample(
    decoder: CachedDecoder, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
    temperature: float, top_k: int, suppressed: tuple[int, ...], eos_token_id: int,
    pad_token_id: int,
) -> Tensor:  # fmt: skip
    """`sample_tokens`' loop, by `decoder`."""
    batch, prompt_length = input_ids.shape
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
