"""GPT: a causal transformer trained to predict the next token (the pretraining of LLMs).

Pre-norm blocks, fused scaled-dot-product attention, the output layer tied to the token
embedding, GPT-2's initialisation. The parameter names follow `transformers`' GPT2LMHeadModel,
so a run exports to (and `--init` imports from) a GPT-2 checkpoint that the Auto classes load;
only GPT-2's Conv1D layers store their weights transposed. The MLP's GELU is exact (`gelu`, as
in nanoGPT) by default: GPT-2's tanh approximation (`gelu_new`, chosen by `--activation` or by a
GPT-2 checkpoint given to `--init`) took 2.2x the time of the exact one, forward + backward, on
this CPU.

Why a compact model of our own rather than training GPT2LMHeadModel directly: the tiny
nanoGPT configuration spends much of each step in per-module overhead, and this model took
14% less time per training step than GPT2LMHeadModel with the same weights (median of 30
interleaved steps each, baby-GPT config, 1 thread, on the shared 2-core machine); it is also
the whole model in one screen, as in nanoGPT.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.core.tokenizer import encode_text, load_tokenizer
from selfsup.lm.models.base import LanguageModule
from selfsup.lm.models.hf import local_config, local_weights, save_hf
from selfsup.lm.options import LMConfig

HF_DIR = "hf"


@dataclass
class Options:
    """GPT options of `selfsup lm pretrain gpt` (defaults: nanoGPT's CPU "baby GPT"): the
    arguments of `GPT` but its vocabulary size."""

    block_size: int = option(64, "context length in tokens", check=">=1")
    n_layer: int = option(4, "transformer blocks", check=">=1")
    n_head: int = option(4, "attention heads", check=">=1")
    n_embd: int = option(128, "width of the residual stream", check=">=1")
    dropout: float = option(0.0, "dropout probability", check="[0,1)")
    activation: str = option("gelu", "MLP activation: gelu (exact) | gelu_new (GPT-2's tanh form)")


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
        )
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, d)))


ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh"}  # transformers' name -> GELU's approximation


class MLP(nn.Module):
    def __init__(self, dim: int, dropout: float, activation: str = "gelu") -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU(approximate=ACTIVATIONS[activation])
        self.c_proj = nn.Linear(4 * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, dropout: float, activation: str = "gelu") -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, dropout, activation)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids B×T (T ≤ block_size) -> next-token logits B×T×vocab."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.vocab_size, self.block_size, self.activation = vocab_size, block_size, activation
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                drop=nn.Dropout(dropout),
                h=nn.ModuleList(Block(n_embd, n_head, dropout, activation) for _ in range(n_layer)),
                ln_f=nn.LayerNorm(n_embd),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        positions = torch.arange(t, device=ids.device)
        tr = self.transformer
        x = tr.drop(tr.wte(ids) + tr.wpe(positions))
        for block in tr.h:
            x = block(x)
        return self.lm_head(tr.ln_f(x))

    @torch.no_grad()
    def generate(
        self,
        ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Extend ids (B×T) by sampling; temperature 0 is greedy decoding."""
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.block_size :])[:, -1].float()
            if temperature == 0:
                next_id = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = logits.softmax(-1)
                next_id = torch.multinomial(probs, 1, generator=generator)
            ids = torch.cat([ids, next_id], dim=1)
        return ids


# --- Hugging Face GPT-2 conversion -------------------------------------------------------

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_MASKS = (".attn.bias", ".attn.masked_bias")  # GPT-2's causal-mask buffers, if any
# GPT's shape arguments (its attributes, Options' fields) -> the GPT2Config fields that hold them
GPT2_NAMES = {
    "block_size": "n_positions",
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_embd": "n_embd",
    "activation": "activation_function",
}


def to_hf(model: GPT, tokenizer: Any = None) -> Any:
    """The same network as a `transformers` GPT2LMHeadModel (GPT-2's Conv1D stores W^T)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = getattr(tokenizer, "eos_token_id", None)
    dropout = float(model.transformer.drop.p)
    config = GPT2Config(
        vocab_size=model.vocab_size,
        **{theirs: getattr(model, ours) for ours, theirs in GPT2_NAMES.items()},
        # the configured dropout, for the stages that train the export further (SFT, reward);
        # evaluation and generation run in eval mode, PPO turns it off
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=True,
    )
    hf = GPT2LMHeadModel(config)
    missing, unexpected = hf.load_state_dict(_transposed(model.state_dict()), strict=False)
    if unexpected or any(not name.endswith(_MASKS) for name in missing):
        raise RuntimeError(f"GPT-2 conversion: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def from_hf(hf: Any) -> GPT:
    """Our GPT with the weights of a `transformers` GPT-2 model."""
    c = hf.config
    activation = {"gelu_pytorch_tanh": "gelu_new"}.get(c.activation_function, c.activation_function)
    if activation not in ACTIVATIONS or not c.tie_word_embeddings:
        raise SelfsupError(
            f"--init: GPT-2 checkpoints with activation {c.activation_function!r} or untied "
            "output weights are not supported"
        )
    shape = {ours: getattr(c, theirs) for ours, theirs in GPT2_NAMES.items()}
    model = GPT(c.vocab_size, **{**shape, "activation": activation})
    model.load_state_dict(_transposed(hf.state_dict()))
    return model


def _transposed(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict with the Conv1D weights transposed (either way: ours <-> GPT-2's), on the
    CPU, contiguous, without the causal-mask buffers."""
    return {
        name: (p.t() if name.endswith(_CONV1D) else p).detach().cpu().contiguous()
        for name, p in state.items()
        if not name.endswith(_MASKS)
    }


GPT2 = "GPT-2 (model_type 'gpt2')"


def load_hf_gpt(path: str | Path, what: str = "--init") -> GPT:
    """A local GPT-2 checkpoint folder (config.json + weights), read without any download."""
    from transformers import AutoModelForCausalLM

    local_config(path, what, "gpt2", GPT2)
    return from_hf(local_weights(path, AutoModelForCausalLM, what))


# --- Training (a kind of `selfsup lm pretrain`) -----------------------------------------


class GPTModule(LanguageModule):
    """Next-token prediction: inputs are a window of the corpus, targets the same shifted by one."""

    Options = Options
    help = "GPT: a causal transformer trained to predict the next token (the pretraining of LLMs)."
    # benchmarks/gpt_shakespeare.py's recipes (README: "Language"), by name, over the defaults
    presets = {
        "baby": {},  # the defaults, nanoGPT's CPU baby GPT: val loss about 1.90 on tinyshakespeare
        "baby-fast": {"steps": 1200, "lr": 4e-3},  # about 1.87 in 90 s on 2 CPU cores
        "long": {"steps": 2500, "batch_size": 32, "lr": 1.5e-3, "block_size": 128,
                 "eval_interval": 500},
    }  # fmt: skip
    SPECIAL_TOKENS = ("<|endoftext|>",)  # separates documents; starts generation from nothing
    load_init = staticmethod(load_hf_gpt)

    def __init__(self, config: LMConfig, options: Options, vocab_size: int) -> None:
        super().__init__(config, options, vocab_size)
        self.model = GPT(vocab_size, **asdict(options))

    @classmethod
    def build(cls, config: LMConfig, options: Options, tokenizer: Any, init: Any) -> GPTModule:
        if init is not None:  # the checkpoint fixes the architecture
            options = replace(options, **{name: getattr(init, name) for name in GPT2_NAMES})
        if options.activation not in ACTIVATIONS:
            raise SelfsupError(
                f"--activation must be one of {', '.join(ACTIVATIONS)}, got {options.activation!r}"
            )
        if options.n_embd % options.n_head:
            raise SelfsupError(
                f"--n-embd {options.n_embd} must be a multiple of --n-head {options.n_head}"
            )
        module = cls(config, options, init.vocab_size if init is not None else len(tokenizer))
        if init is not None:
            module.model.load_state_dict(init.state_dict())
        return module

    def check_data(self, train_ids: np.ndarray, val_ids: np.ndarray) -> None:
        need = self.options.block_size + 1
        if len(train_ids) < need or len(val_ids) < need:
            raise SelfsupError(
                f"--block-size {self.options.block_size} is longer than the corpus allows: "
                f"{len(train_ids)} training and {len(val_ids)} validation tokens, each split "
                f"needs at least {need}; lower --block-size or use a longer corpus"
            )

    def make_batch(self, ids: np.ndarray, rng: np.random.Generator, batch_size: int) -> Tensor:
        span = self.options.block_size + 1
        starts = rng.integers(0, len(ids) - span + 1, size=batch_size)
        return torch.from_numpy(np.stack([ids[s : s + span] for s in starts]).astype(np.int64))

    def loss(self, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()), {}

    def export(self, run: Path, tokenizer: Any) -> None:
        """RUN/hf: a GPT-2 checkpoint + tokenizer for AutoModelForCausalLM / AutoTokenizer."""
        save_hf(run, to_hf(self.model, tokenizer), tokenizer, HF_DIR)


# --- Generation ---------------------------------------------------------------------------


def load_run(run: str | Path, prompt: str | None = None) -> tuple[GPT, Any, list[int]]:
    """(model in eval mode, tokenizer, ids of `prompt`) of a GPT run's exported `hf/` folder.

    The tokenizer and the prompt are checked before the weights are read.
    """
    folder = Path(run) / HF_DIR
    if not folder.is_dir():
        raise SelfsupError(f"{folder} is missing: the run {run} has not finished training")
    tokenizer = load_tokenizer(folder)
    ids = encode_text(tokenizer, prompt, "--prompt") if prompt else []
    vocab_size = local_config(folder, "run", "gpt2", GPT2).vocab_size
    if len(tokenizer) > vocab_size:
        raise SelfsupError(
            f"vocabulary mismatch in {folder}: the tokenizer has {len(tokenizer)} tokens, the "
            f"model {vocab_size} embeddings"
        )
    return load_hf_gpt(folder, what="run").eval(), tokenizer, ids


def generate_text(
    run: str | Path,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    num_samples: int = 1,
    seed: int = 0,
) -> list[str]:
    """Continuations of `prompt` (prompt included) from a GPT run; temperature 0 is greedy."""
    if temperature < 0:
        raise SelfsupError(f"--temperature must be at least 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise SelfsupError(f"--top-k must be at least 1, got {top_k}")
    if max_new_tokens < 0 or num_samples < 1:
        raise SelfsupError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    model, tokenizer, ids = load_run(run, prompt)
    if not ids:
        if tokenizer.eos_token_id is None:
            raise SelfsupError("--prompt is empty and the tokenizer has no end-of-text token")
        ids = [tokenizer.eos_token_id]
    g = torch.Generator().manual_seed(seed)
    start = torch.tensor([ids] * num_samples)
    out = model.generate(start, max_new_tokens, temperature, top_k, generator=g)
    return [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in out]
