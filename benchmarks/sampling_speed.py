"""Sampling answers: the lean loops (`lm/alignment/decoding.py`) against transformers' `generate`.

For each model, every way of sampling draws from the same left-padded prompts with the same
seeds; the script checks that they draw the same tokens, then times them alternately and prints
tokens per second and each one's time over the lean loop's. `generate` runs with its default
dynamic cache and, where the model takes one, its static cache (`cache_implementation="static"`).
Without a model it builds two random-initialised models of about the same size, a GPT-2 and a
Llama (grouped-query attention), and samples random prompts (answers run to --max-new-tokens).

    OMP_NUM_THREADS=1 python benchmarks/sampling_speed.py                  # GPT-2 and Llama
    python benchmarks/alignment_frontier.py --quick --work /tmp/fq --methods none   # a model
    python benchmarks/sampling_speed.py /tmp/fq/sft --prompts /tmp/fq/data/rl.jsonl
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from selfsup.lm.alignment.decoding import decoder_class, sample_tokens

EOS, PAD = 2, 0


def random_models(width: int, layers: int, vocab: int, positions: int) -> dict[str, Any]:
    """A GPT-2 and a Llama (half as many key/value heads as query heads, SwiGLU at 8/3 width:
    about the GPT-2's parameters), random-initialised, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    heads = max(1, width // 32)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width,
                                      n_layer=layers, n_head=heads))  # fmt: skip
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=8 * width // 3,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), max_position_embeddings=positions,
    ))  # fmt: skip
    return {"gpt2": gpt2.eval(), "llama": llama.eval()}


def random_prompts(batch: int, groups: int, vocab: int) -> dict[str, torch.Tensor]:
    """`groups` prompts of 12 to 40 tokens, each repeated batch/groups times, left-padded."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(12, 41, (groups,), generator=generator).tolist()
    ids = torch.full((groups, max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, vocab, (n,), generator=generator)
        mask[row, -n:] = 1
    repeat = batch // groups
    return {"input_ids": ids.repeat_interleave(repeat, 0),
            "attention_mask": mask.repeat_interleave(repeat, 0)}  # fmt: skip


def samplers(model: Any, prompts: dict, max_new_tokens: int, options: dict, suppressed: tuple,
             ) -> dict[str, Callable[[int], torch.Tensor]]:  # fmt: skip
    """name -> draw(seed): the answer tokens (B×T) of each way of sampling."""
    p = prompts["input_ids"].shape[1]

    def generate(cache: str | None) -> Callable[[int], torch.Tensor]:
        def draw(seed: int) -> torch.Tensor:
            torch.manual_seed(seed)
            out = model.generate(
                **prompts, do_sample=True, temperature=1.0, top_k=None, top_p=None,
                max_new_tokens=max_new_tokens, suppress_tokens=list(suppressed),
                cache_implementation=cache, **options,
            )  # fmt: skip
            return out[:, p:]

        return draw

    def lean(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        tokens = sample_tokens(
            model, **prompts, max_new_tokens=max_new_tokens, temperature=1.0, top_k=0,
            suppressed=suppressed, **options,
        )  # fmt: skip
        assert tokens is not None
        return tokens

    draws = {"generate (dynamic cache)": generate(None), "lean loop": lean}
    try:
        draws["generate (static cache)"] = generate("static")
        draws["generate (static cache)"](0)
    except Exception as error:  # noqa: BLE001  (a model or version without one)
        print(f"  static cache: not available ({type(error).__name__}: {error})")
        del draws["generate (static cache)"]
    return draws


def measure(name: str, model: Any, prompts: dict, args: argparse.Namespace, options: dict,
            suppressed: tuple = ()) -> None:  # fmt: skip
    batch, p = prompts["input_ids"].shape
    params = sum(x.numel() for x in model.parameters()) / 1e6
    if decoder_class(model, p + args.max_new_tokens) is None:
        raise SystemExit(f"no lean decoder serves {name} ({model.config.model_type})")
    print(f"{name}: {type(model).__name__}, {params:.2f} M parameters, batch {batch}, prompts of "
          f"{p} columns, up to {args.max_new_tokens} new tokens, {args.calls} calls")  # fmt: skip
    draws = samplers(model, prompts, args.max_new_tokens, options, suppressed)
    lean = draws["lean loop"]
    for label, draw in draws.items():
        if draw is lean:
            continue
        same = sum(torch.equal(draw(s), lean(s)) for s in range(args.calls))
        print(f"  {label}: the lean loop's tokens in {same} of {args.calls} calls")
    tokens = sum(lean(s).numel() for s in range(args.calls))
    times: dict[str, list[float]] = {label: [] for label in draws}
    for _ in range(args.repeats):
        for label, draw in draws.items():
            start = time.perf_counter()
            for seed in range(args.calls):
                draw(seed)
            times[label].append(time.perf_counter() - start)
    best = {label: min(t) for label, t in times.items()}
    for label, seconds in best.items():
        print(f"  {label:26s} {seconds:7.3f} s  {tokens / seconds:9.0f} tokens/s  "
              f"{seconds / best['lean loop']:5.2f}x the lean loop's time")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="an SFT/RLHF run folder (RUN/hf); default: "
                        "a random GPT-2 and a random Llama")  # fmt: skip
    parser.add_argument("--prompts", help="a prompts .jsonl (with a model)")
    parser.add_argument("--prompts-per-call", type=int, default=2)
    parser.add_argument("--answers-per-prompt", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=128, help="random models' width")
    parser.add_argument("--layers", type=int, default=4, help="random models' blocks")
    parser.add_argument("--vocab", type=int, default=2048, help="random models' vocabulary")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = args.prompts_per_call * args.answers_per_prompt
    if args.model is None:
        prompts = random_prompts(batch, args.prompts_per_call, args.vocab)
        options = dict(eos_token_id=EOS, pad_token_id=PAD)
        for name, model in random_models(args.width, args.layers, args.vocab, 256).items():
            measure(name, model, prompts, args, options, (PAD,))
        return
    if args.prompts is None:
        parser.error("--prompts is needed with a model")
    from selfsup.lm.alignment.rlhf import load_policy, load_prompts
    from selfsup.lm.alignment.rollout import encode_prompts, suppressed_tokens

    tokenizer, model = load_policy(args.model)
    conversations, _ = load_prompts(args.prompts)
    chosen = [c for c in conversations[: args.prompts_per_call]
              for _ in range(args.answers_per_prompt)]  # fmt: skip
    options = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    measure(args.model, model, encode_prompts(tokenizer, chosen), args, options,
            suppressed_tokens(tokenizer))  # fmt: skip


if __name__ == "__main__":
    main()
