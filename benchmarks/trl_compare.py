"""Ours against TRL on the same work: DPO and GRPO from the same SFT model (a Hugging Face GPT-2
folder), on the same prompts, preference pairs, reward and β, on the CPU, in one run.

Reads the pipeline that benchmarks/alignment_frontier.py builds in --work (data/, sft/, rm/,
rankings.jsonl), trains each method with selfsup and with TRL (`DPOTrainer`, `GRPOTrainer`),
and measures every final policy alike (`rlhf.evaluate_policy`: gold, proxy reward and
KL(policy || SFT) from one sampled answer per held-out prompt), with each trainer's wall time.

    python benchmarks/alignment_frontier.py --quick --work /tmp/frontier   # builds the pipeline
    python benchmarks/trl_compare.py --work /tmp/frontier

Matched settings: GRPO — G answers per prompt, the same prompts per step, one gradient step per
batch of answers, clip 0.2, β on the k3 KL, TRL's loss_type "grpo" (per-answer token mean, as
ours), answers sampled at temperature 1 with the padding and role markers suppressed in both, and
TRL's reward function our reward model's score (an answer with no end marker scores
--no-end-score, -1, as in ours). DPO — the same pairs (every strictly ordered pair of the
rankings, identical answers left out) in TRL's conversational format, the same β, learning
rate, batch size and epochs, sigmoid loss, 10 warm-up steps then cosine decay. Both: AdamW
without weight decay, gradients clipped at norm 1, dropout off, float32 (TRL's configs default to
bf16=True, which on a CPU trains and samples under bfloat16 autocast; ours trains in float32).
Wall time is the whole training
call of each (ours: reference log-probabilities / two tiny evaluations included; TRL's:
dataset tokenization included), not the held-out evaluation after it; each trainer is called
once untimed first (GRPO for 4 steps), so that neither pays the process's imports and first
allocations in the first seed's time (--no-warmup times them too).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _prompts(path: Path) -> tuple[list, list]:
    from selfsup.lm.alignment.rlhf import load_prompts

    return load_prompts(str(path))


def _evaluate(work: Path, eval_prompts: int):
    from selfsup.lm.alignment.rlhf import evaluate_policy, gold_fn, load_policy, load_reward_model
    from selfsup.lm.options import PPOSettings

    conv, records = _prompts(work / "data" / "eval.jsonl")
    conv, records = conv[:eval_prompts], records[:eval_prompts]
    gold = gold_fn("arithmetic", records)
    tokenizer, reference = load_policy(work / "sft")
    reward_model = load_reward_model(work / "rm", tokenizer)

    def evaluate(policy: Any) -> dict[str, float]:
        return evaluate_policy(policy.eval(), reference, reward_model, tokenizer, conv, gold,
                               PPOSettings(), seed=10_000)  # fmt: skip

    return evaluate


def trl_grpo(work: Path, out: Path, args: argparse.Namespace) -> Any:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from selfsup.lm.alignment.rlhf import load_policy, load_reward_model
    from selfsup.lm.alignment.rollout import position_ids, suppressed_tokens
    from selfsup.lm.data.chat_data import collate

    tokenizer, policy = load_policy(work / "sft")
    reward_model = load_reward_model(work / "rm", tokenizer)
    conv, _ = _prompts(work / "data" / "rl.jsonl")
    end = tokenizer.eos_token_id

    @torch.no_grad()
    def reward(prompts, completions, completion_ids, **_: Any) -> list[float]:
        from selfsup.lm.data.conversations import tokenize_chat

        rows = []
        for p, c, ids in zip(prompts, completions, completion_ids, strict=True):
            text = c[0]["content"] if isinstance(c, list) else c
            # score the same tokens ours scores: the prompt, the answer's ids and its end marker
            prompt_ids = tokenize_chat(tokenizer, p)[0] + [tokenizer.convert_tokens_to_ids(
                "<ASSISTANT>")]  # fmt: skip
            rows.append((prompt_ids + list(ids), end in ids, text))
        batch = collate([(r[0], r[0]) for r in rows], tokenizer.pad_token_id)
        scores = reward_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids(batch["attention_mask"]),
        ).logits[:, 0]
        return [float(s) if ended else args.no_end_score
                for s, (_, ended, _) in zip(scores, rows, strict=True)]  # fmt: skip

    dataset = Dataset.from_list([{"prompt": c} for c in conv])
    per_step = args.prompts_per_step * args.group_size
    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=per_step,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        learning_rate=args.lr, beta=args.beta, epsilon=0.2, loss_type="grpo",
        max_steps=args.iterations, temperature=1.0, top_k=0, top_p=1.0, use_cpu=True, bf16=False,
        report_to="none", save_strategy="no", logging_steps=max(1, args.iterations // 4),
        seed=args.seed, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        generation_kwargs={"suppress_tokens": list(suppressed_tokens(tokenizer))},
        disable_dropout=True,
    )  # fmt: skip
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer)  # fmt: skip
    trainer.train()
    return trainer.model


def ours_grpo(work: Path, out: Path, args: argparse.Namespace) -> Any:
    from selfsup.lm.alignment.grpo import Options as GRPOConfig
    from selfsup.lm.alignment.grpo import grpo
    from selfsup.lm.alignment.rlhf import load_policy

    run = grpo(GRPOConfig(
        policy=str(work / "sft"), reward=str(work / "rm"), prompts=str(work / "data" / "rl.jsonl"),
        out=str(out), iterations=args.iterations, eval_every=args.iterations, eval_samples=8,
        prompts_per_iteration=args.prompts_per_step, group_size=args.group_size,
        minibatch=args.prompts_per_step * args.group_size, lr=args.lr, beta=args.beta,
        max_new_tokens=args.max_new_tokens, no_end_score=args.no_end_score, seed=args.seed,
        accelerator="cpu", progress=False,
    ))  # fmt: skip
    return load_policy(run)[1]


def _pairs(work: Path) -> list[dict]:
    from selfsup.lm.alignment.dpo import preference_pairs
    from selfsup.lm.data.conversations import read_rankings

    pairs, _ = preference_pairs(read_rankings(work / "rankings.jsonl"))
    return [{"prompt": p, "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in pairs]  # fmt: skip


def trl_dpo(work: Path, out: Path, args: argparse.Namespace) -> Any:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from selfsup.lm.alignment.rlhf import load_policy

    tokenizer, policy = load_policy(work / "sft")
    config = DPOConfig(
        output_dir=str(out), beta=args.dpo_beta, learning_rate=args.dpo_lr,
        per_device_train_batch_size=args.dpo_batch_size, num_train_epochs=1, max_length=96,
        use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=args.seed,
        logging_steps=50, loss_type=["sigmoid"], lr_scheduler_type="cosine", warmup_steps=10,
        weight_decay=0.0, max_grad_norm=1.0, disable_dropout=True,
    )  # fmt: skip
    trainer = DPOTrainer(model=policy, args=config, train_dataset=Dataset.from_list(_pairs(work)),
                         processing_class=tokenizer)  # fmt: skip
    trainer.train()
    return trainer.model


def ours_dpo(work: Path, out: Path, args: argparse.Namespace) -> Any:
    from selfsup.lm.alignment.dpo import Options as DPOConfig
    from selfsup.lm.alignment.dpo import dpo
    from selfsup.lm.alignment.rlhf import load_policy

    run = dpo(DPOConfig(
        init=str(work / "sft"), data=str(work / "rankings.jsonl"), out=str(out), epochs=1,
        lr=args.dpo_lr, batch_size=args.dpo_batch_size, beta=args.dpo_beta, max_length=96,
        val_fraction=0.0, seed=args.seed, accelerator="cpu", progress=False,
    ))  # fmt: skip
    return load_policy(run)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="alignment_frontier.py's --work folder")
    parser.add_argument("--methods", default="grpo,dpo")
    parser.add_argument("--iterations", type=int, default=24, help="GRPO steps")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5, help="GRPO learning rate")
    parser.add_argument("--beta", type=float, default=0.04, help="GRPO's KL weight")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--no-end-score", type=float, default=-1.0)
    parser.add_argument("--dpo-beta", type=float, default=0.5)
    parser.add_argument("--dpo-lr", type=float, default=5e-5)
    parser.add_argument("--dpo-batch-size", type=int, default=16)
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--seeds", default="0", help="comma list")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-warmup", action="store_true",
        help="time each trainer's first call too (imports, first allocations)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    evaluate = _evaluate(work, args.eval_prompts)
    runs = {"grpo": (ours_grpo, trl_grpo), "dpo": (ours_dpo, trl_dpo)}
    rows = []
    if not args.no_warmup:  # one untimed call of each trainer (GRPO: 4 steps) before the clock
        warm = argparse.Namespace(**{**vars(args), "seed": 0, "iterations": 4})
        for method in args.methods.split(","):
            for who, train in zip(("selfsup", "TRL"), runs[method], strict=True):
                out = work / f"warmup-{method}-{who.lower()}"
                train(work, out, warm)
                shutil.rmtree(out, ignore_errors=True)
    for seed in [int(x) for x in args.seeds.split(",")]:
        args.seed = seed
        for method in args.methods.split(","):
            for who, train in zip(("selfsup", "TRL"), runs[method], strict=True):
                out = work / f"compare-{method}-{who.lower()}-s{seed}"
                shutil.rmtree(out, ignore_errors=True)
                torch.manual_seed(seed)
                start = time.perf_counter()
                policy = train(work, out, args)
                wall = time.perf_counter() - start
                rows.append({"method": method.upper(), "trainer": who, "seed": seed,
                             "wall_s": wall, **evaluate(policy)})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    (work / "trl_compare.json").write_text(json.dumps(rows, indent=1))
    print("| method | trainer | seeds | wall (s) | gold | proxy | KL from SFT (nats) |")
    print("|---|---|---|---|---|---|---|")
    for method in dict.fromkeys(r["method"] for r in rows):
        for who in ("selfsup", "TRL"):
            rs = [r for r in rows if r["method"] == method and r["trainer"] == who]
            cell = {k: (np.mean([r[k] for r in rs]), np.std([r[k] for r in rs]))
                    for k in ("wall_s", "gold", "proxy", "kl")}  # fmt: skip
            wall, gold, proxy, kl = (cell[k] for k in ("wall_s", "gold", "proxy", "kl"))
            print(
                f"| {method} | {who} | {len(rs)} | {wall[0]:.1f} ± {wall[1]:.1f} | "
                f"{gold[0]:.3f} ± {gold[1]:.3f} | {proxy[0]:.2f} | {kl[0]:.2f} ± {kl[1]:.2f} |"
            )
        ours = [r["wall_s"] for r in rows if r["method"] == method and r["trainer"] == "selfsup"]
        theirs = [r["wall_s"] for r in rows if r["method"] == method and r["trainer"] == "TRL"]
        print(f"{method}: wall time ours / TRL's = {np.sum(ours) / np.sum(theirs):.2f}")


if __name__ == "__main__":
    main()
