"""Sampling answers: the lean GPT-2 loop (`lm/alignment/decoding.py`) against `generate`.

Both draw from the same prompts with the same seeds; the script checks they draw the same
tokens, then times them alternately and prints the ratio.

    python benchmarks/alignment_frontier.py --quick --work /tmp/fq --methods none   # a model
    python benchmarks/sampling_speed.py /tmp/fq/sft --prompts /tmp/fq/data/rl.jsonl
"""

from __future__ import annotations

import argparse
import time

import torch

from selfsup.lm.alignment.decoding import sample_tokens
from selfsup.lm.alignment.rlhf import load_policy, load_prompts
from selfsup.lm.alignment.rollout import encode_prompts, suppressed_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="an SFT/RLHF run folder (RUN/hf) of a GPT-2 model")
    parser.add_argument("--prompts", required=True, help="a prompts .jsonl")
    parser.add_argument("--prompts-per-call", type=int, default=2)
    parser.add_argument("--answers-per-prompt", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer, model = load_policy(args.model)
    conversations, _ = load_prompts(args.prompts)
    batch = [c for c in conversations[: args.prompts_per_call]
             for _ in range(args.answers_per_prompt)]  # fmt: skip
    prompts = encode_prompts(tokenizer, batch)
    options = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    suppressed = suppressed_tokens(tokenizer)

    def generate(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        out = model.generate(
            **prompts, do_sample=True, temperature=1.0, top_k=None, top_p=None,
            max_new_tokens=args.max_new_tokens, suppress_tokens=list(suppressed), **options,
        )  # fmt: skip
        return out[:, prompts["input_ids"].shape[1] :]

    def lean(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        tokens = sample_tokens(
            model, **prompts, max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=0,
            suppressed=suppressed, **options,
        )  # fmt: skip
        if tokens is None:
            raise SystemExit("the lean loop does not apply to this model (not GPT-2?)")
        return tokens

    same = sum(torch.equal(generate(s), lean(s)) for s in range(args.calls))
    print(f"same tokens in {same} of {args.calls} calls")
    for _ in range(args.repeats):
        times = []
        for draw in (generate, lean):
            start = time.perf_counter()
            for seed in range(args.calls):
                draw(seed)
            times.append(time.perf_counter() - start)
        print(f"generate {times[0]:.3f} s, lean loop {times[1]:.3f} s: {times[1] / times[0]:.2f}")


if __name__ == "__main__":
    main()
