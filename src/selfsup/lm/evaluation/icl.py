"""In-context learning: learning from examples in the prompt, with no weight update.

- `few_shot`: k demonstrations ("question answer" lines) before a question; accuracy of a
  pretrained model's greedy continuation against k.
- Linear regression in context (Garg et al., 2022): a transformer reads (x₁, y₁, …, x_k, y_k,
  x_query) for a fresh random w per sequence (y = w·x) and predicts y_query. Trained on such
  sequences, it has to infer w from the prompt; its error against k is compared with least
  squares (the optimum), k-nearest neighbours and averaging (ŵ = mean of y_i·x_i).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from selfsup.core.errors import SelfsupError


# ---------------------------------------------------------------- linear regression in context
def regression_batch(
    batch: int, points: int, dims: int, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """x: B×points×dims ~ N(0, I), y: B×points = x·w with one w ~ N(0, I) per sequence."""
    x = torch.randn(batch, points, dims, generator=g)
    w = torch.randn(batch, dims, 1, generator=g)
    return x, (x @ w).squeeze(-1)


def interleave(x: Tensor, y: Tensor) -> Tensor:
    """The token sequence x₁, y₁, x₂, y₂, …: B×2n×d, each y_i a vector (y_i, 0, …, 0)."""
    b, n, d = x.shape
    ys = torch.zeros_like(x)
    ys[..., 0] = y
    return torch.stack([x, ys], dim=2).reshape(b, 2 * n, d)


class RegressionTransformer(nn.Module):
    """A GPT-2 (transformers' implementation) reading vectors: linear read-in, causal
    transformer, linear read-out of the prediction of y_i at the position of x_i."""

    def __init__(self, dims: int, points: int, width: int = 64, layers: int = 4, heads: int = 4):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        config = GPT2Config(
            n_positions=2 * points, n_embd=width, n_layer=layers, n_head=heads,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, vocab_size=1,
        )  # fmt: skip
        self.read_in = nn.Linear(dims, width)
        self.backbone = GPT2Model(config)
        self.read_out = nn.Linear(width, 1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Predictions B×n of every y_i from (x₁, y₁, …, x_i)."""
        hidden = self.backbone(inputs_embeds=self.read_in(interleave(x, y))).last_hidden_state
        return self.read_out(hidden[:, ::2]).squeeze(-1)


def least_squares(x: Tensor, y: Tensor, query: Tensor) -> Tensor:
    """Minimum-norm least squares fitted on the k examples (k may be below d)."""
    return (query.unsqueeze(1) @ (torch.linalg.pinv(x) @ y.unsqueeze(-1))).squeeze(-1).squeeze(-1)


def averaging(x: Tensor, y: Tensor, query: Tensor) -> Tensor:
    """ŵ = mean_i y_i·x_i (unbiased for x ~ N(0, I))."""
    w = (y.unsqueeze(-1) * x).mean(1)
    return (w * query).sum(-1)


def nearest_neighbours(x: Tensor, y: Tensor, query: Tensor, n: int = 3) -> Tensor:
    """The mean y of the n examples nearest to the query."""
    distances = (x - query.unsqueeze(1)).norm(dim=-1)
    idx = distances.topk(min(n, x.shape[1]), largest=False).indices
    return y.gather(1, idx).mean(1)


@dataclass
class RegressionResult:
    ks: list[int]
    errors: dict[str, list[float]]  # method -> mean squared error / dims, per k


def evaluate_regression(
    model: RegressionTransformer, dims: int, points: int, samples: int = 1000, seed: int = 1
) -> RegressionResult:
    """Normalised squared error (÷ d, so predicting 0 scores 1) of each method against the
    number k of in-context examples before the query, on fresh sequences."""
    g = torch.Generator().manual_seed(seed)
    x, y = regression_batch(samples, points, dims, g)
    with torch.no_grad():
        predictions = model.eval()(x, y)
    ks = list(range(points))
    errors: dict[str, list[float]] = {
        m: [] for m in ("transformer", "least squares", "3-NN", "averaging")
    }
    for k in ks:
        target, query = y[:, k], x[:, k]
        baselines = {
            "transformer": predictions[:, k],
            "least squares": least_squares(x[:, :k], y[:, :k], query)
            if k
            else torch.zeros_like(target),
            "3-NN": nearest_neighbours(x[:, :k], y[:, :k], query)
            if k
            else torch.zeros_like(target),
            "averaging": averaging(x[:, :k], y[:, :k], query) if k else torch.zeros_like(target),
        }
        for name, pred in baselines.items():
            errors[name].append(((pred - target) ** 2).mean().item() / dims)
    return RegressionResult(ks, errors)


def train_regression(
    dims: int = 5,
    points: int = 20,
    steps: int = 2000,
    batch: int = 64,
    lr: float = 1e-3,
    width: int = 64,
    layers: int = 4,
    heads: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> RegressionTransformer:
    """Train the transformer on fresh random regression tasks (a new w for every sequence)."""
    if dims < 1 or points < 2:
        raise SelfsupError(f"--dims must be >= 1 and --points >= 2, got {dims} and {points}")
    if width % heads:
        raise SelfsupError(f"--width {width} must be divisible by --heads {heads}")
    torch.manual_seed(seed)
    model = RegressionTransformer(dims, points, width, layers, heads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="in-context regression", disable=not progress)
    for _ in bar:
        x, y = regression_batch(batch, points, dims, g)
        loss = ((model(x, y) - y) ** 2).mean() / dims
        if not torch.isfinite(loss):
            raise SelfsupError(f"the regression loss became {loss.item()}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model


def plot_regression(result: RegressionResult, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for name, errs in result.errors.items():
        ax.plot(result.ks, errs, marker="o", markersize=3, label=name)
    ax.set_xlabel("in-context examples k")
    ax.set_ylabel("squared error / d")
    ax.set_ylim(0, 1.5)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Linear regression in context")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------ few-shot prompts
def _qa_pairs(path: str | Path) -> list[tuple[str, str]]:
    from selfsup.lm.data.conversations import read_conversations

    pairs = []
    for messages in read_conversations(path):
        users = [m["content"] for m in messages if m["role"] == "user"]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        pairs.append((users[0], answers[0]))
    return pairs


def few_shot_prompt(demos: Sequence[tuple[str, str]], question: str) -> str:
    """k "QUESTION ANSWER" lines, then the question. The prompt ends at the question, not at
    the space before the answer: a byte-level BPE writes " 5" as one token, so a prompt ending
    in a space would end in a lone space token the model never saw before an answer."""
    return "".join(f"{q} {a}\n" for q, a in demos) + question


def few_shot(
    model_path: str,
    data: str,
    shots: Sequence[int],
    questions: int = 100,
    max_new_tokens: int = 24,
    seed: int = 0,
) -> dict[int, float]:
    """Exact-match accuracy of greedy answers after k demonstrations, for each k.

    `data`: JSONL of prompt/completion pairs (or conversations); the last `questions` pairs are
    asked, demonstrations are drawn from the others. Each line of the prompt is
    "QUESTION ANSWER"; the model's answer is its continuation up to the end of the line.
    """
    from transformers import AutoModelForCausalLM

    from selfsup.core.tokenizer import encode_text
    from selfsup.lm.data.context import check_new_tokens, context_length
    from selfsup.lm.models import lora

    tokenizer, model = lora.load_tokenizer_and(model_path, AutoModelForCausalLM)
    model.eval()
    pairs = _qa_pairs(data)
    if len(pairs) <= questions:
        raise SelfsupError(
            f"--data has {len(pairs)} pairs: need more than --limit {questions} "
            "(the rest are demonstrations)"
        )
    pool, asked = pairs[:-questions], pairs[-questions:]
    rng = np.random.default_rng(seed)
    newline = encode_text(tokenizer, "\n", "a newline")
    context = context_length(model)
    check_new_tokens(max_new_tokens, context)
    room = math.inf if context is None else context - max_new_tokens
    fitting = min(len(pool), _shots_that_fit(tokenizer, pool, asked, room))
    why = f"{len(pool)} pairs to draw from beside the --limit {questions} asked"
    if context is not None:
        why += f", the model's context of {context} tokens with --max-new-tokens {max_new_tokens}"
    prompts: dict[int, list[list[int]]] = {}
    for k in shots:  # every prompt first: a k that does not fit stops before any answer
        if k <= len(pool):
            draws = [rng.choice(len(pool), k, replace=False) if k else [] for _ in asked]
            prompts[k] = [
                encode_text(tokenizer, few_shot_prompt([pool[i] for i in d], q), "the prompt")
                for d, (q, _) in zip(draws, asked, strict=True)
            ]
        if k > len(pool) or max(map(len, prompts[k])) > room:
            raise SelfsupError(
                f"--shots {k}: "
                + (f"at most {fitting} demonstrations fit" if fitting >= 0 else
                   "even a question alone does not fit")
                + f" ({why})"
            )  # fmt: skip
    accuracy = {}
    for k in shots:
        correct = 0
        for prompt, (_, answer) in tqdm(
            list(zip(prompts[k], asked, strict=True)), desc=f"{k}-shot", leave=False
        ):
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=max_new_tokens, eos_token_id=newline[0],
                    pad_token_id=tokenizer.pad_token_id or newline[0],
                )  # fmt: skip
            text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            correct += text.split("\n")[0].strip() == answer.strip()
        accuracy[k] = correct / len(asked)
    return accuracy


def _shots_that_fit(
    tokenizer: Any,
    pool: Sequence[tuple[str, str]],
    asked: Sequence[tuple[str, str]],
    room: float,
) -> int:
    """The most demonstrations whose prompts fit `room` tokens whichever are drawn (the longest
    ones before the longest question); -1 when even the longest question alone does not."""
    from selfsup.core.tokenizer import encode_text

    if room == math.inf:
        return len(pool)
    lines = sorted((len(encode_text(tokenizer, f"{q} {a}\n")) for q, a in pool), reverse=True)
    room -= max(len(encode_text(tokenizer, q)) for q, _ in asked)
    return int(np.searchsorted(np.cumsum(lines), room, side="right")) if room >= 0 else -1


def save_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
