"""Ours against TRL on the same work: SFT, DPO and GRPO on the same model, data, seeds and
settings, on the CPU in float32, in one run; full fine-tuning and (--lora) LoRA adapters.

Reads (and builds when missing) the pipeline of benchmarks/alignment_frontier.py in --work: with
--arch gpt2 its GPT-2 pretrained on the corpus, with --arch llama a random-initialised Hugging
Face Llama of about the same size (RoPE, grouped-query attention, SwiGLU) with the pipeline's
character tokenizer, Llama 3's special tokens and a Jinja chat template of its own
(`alignment_frontier.llama_base`); then SFT -> rankings -> reward model as that file does. Each
method trains once with selfsup and once with TRL (`SFTTrainer`, `DPOTrainer`, `GRPOTrainer`),
and every final model is measured alike: gold, proxy reward and KL(policy || the pipeline's SFT)
from one sampled answer per held-out prompt (`rlhf.evaluate_policy`), and for SFT the held-out
loss (assistant-token cross-entropy on fewshot.jsonl's answers, selfsup's mask); beside it each
trainer's own last training loss, its wall time and its process's CPU time (with one thread
a side, less disturbed than wall time by other work on a shared machine).

    python benchmarks/trl_compare.py --arch llama --quick --lora --work /tmp/trl-llama
    python benchmarks/trl_compare.py --work /tmp/frontier          # GPT-2: DPO and GRPO

Matched settings: SFT (--arch llama) -- from the random-initialised Llama, the pipeline's SFT
conversations (sft.jsonl as `messages`), loss on the assistant's tokens only on both sides
(TRL's assistant_only_loss through the template's {% generation %} markers, which cover the
answer and its <|eot_id|>, the same tokens selfsup's mask trains), token-mean cross-entropy,
the same learning rate, batch size, epochs and max length, no packing, TRL's gradient
checkpointing off (its default is on). GRPO -- G answers per prompt, the same prompts per step,
one gradient step per batch of answers, clip 0.2, β on the k3 KL, TRL's loss_type "grpo"
(per-answer token mean, as ours), answers sampled at temperature 1 with the padding and role
tokens suppressed in both, and TRL's reward function our reward model's score of the rendered
prompt and the answer's tokens (an answer with no end token scores --no-end-score, -1, as in
ours). DPO -- the same pairs (every strictly ordered pair of the rankings, identical answers
left out) in TRL's conversational format, the same β, learning rate, batch size and epochs,
sigmoid loss. SFT and DPO: 10 warm-up steps then cosine decay. All: AdamW without weight
decay, gradients clipped at norm 1, dropout off, float32 (TRL's configs default to bf16=True,
which on a CPU trains and samples under bfloat16 autocast; ours trains in float32). --lora:
rank --lora-r adapters (alpha --lora-alpha, no dropout) on every linear layer but the output
("all-linear") on both sides (TRL: `peft_config=LoraConfig(...)`; ours: --lora-r), the
learning rates times --lora-lr-scale on both; DPO and GRPO use the base with adapters off as
the reference on both sides (ours also trains the padding token's embedding row, a peft
trainable token). Wall time is the whole training call of each (ours: reference
log-probabilities / two tiny evaluations included; TRL's: dataset tokenization included), not
the held-out evaluation after it; each trainer is called once untimed first (on 64 examples,
GRPO for 4 steps), so that neither pays the process's imports and first allocations in the
first seed's time (--no-warmup times them too). --quick: the quick pipeline, 2 SFT epochs, 12
GRPO steps. Run with OMP_NUM_THREADS=1 (--threads 1): both sides alike.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import alignment_frontier as frontier  # noqa: E402  (the pipeline: benchmarks/ is no package)

WARM = 64  # examples (SFT conversations, DPO pairs) of the untimed first call


def _prompts(path: Path) -> tuple[list, list]:
    from selfsup.lm.alignment.rlhf import load_prompts

    return load_prompts(str(path))


def _as_messages(path: Path, out: Path, limit: int | None = None) -> Path:
    """A prompt/completion JSONL as TRL's conversational `messages` (both sides read it)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
    lines = [json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r["completion"]}]})
             for r in rows]  # fmt: skip
    out.write_text("\n".join(lines) + "\n")
    return out


def _sft_data(work: Path, args: argparse.Namespace) -> Path:
    name = "sft_messages.warm.jsonl" if args.warm else "sft_messages.jsonl"
    return _as_messages(work / "data" / "sft.jsonl", work / name, WARM if args.warm else None)


def _rankings(work: Path, args: argparse.Namespace) -> Path:
    """The rankings file (the warm-up call: enough of its first lines for WARM pairs)."""
    if not args.warm:
        return work / "rankings.jsonl"
    out = work / "rankings.warm.jsonl"
    out.write_text("\n".join((work / "rankings.jsonl").read_text().splitlines()[: WARM // 4]))
    return out


def _evaluate(work: Path, eval_prompts: int):
    """evaluate(policy) -> gold, proxy, KL from the pipeline's SFT, and the held-out loss."""
    from selfsup.lm.alignment.rlhf import evaluate_policy, gold_fn, load_policy, load_reward_model
    from selfsup.lm.data.chat_data import collate, next_token_loss, sft_example
    from selfsup.lm.data.conversations import read_conversations
    from selfsup.lm.options import PPOSettings

    conv, records = _prompts(work / "data" / "eval.jsonl")
    conv, records = conv[:eval_prompts], records[:eval_prompts]
    gold = gold_fn("arithmetic", records)
    tokenizer, reference = load_policy(work / "sft")
    reward_model = load_reward_model(work / "rm", tokenizer)
    held_out = read_conversations(_as_messages(work / "data" / "fewshot.jsonl",
                                               work / "fewshot_messages.jsonl"))  # fmt: skip
    batch = collate([sft_example(tokenizer, c, 10**6) for c in held_out], tokenizer.pad_token_id)

    @torch.no_grad()
    def evaluate(policy: Any) -> dict[str, float]:
        policy = policy.eval()
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = float(next_token_loss(logits, batch["labels"]))
        return {
            "held_out_loss": loss,
            **evaluate_policy(
                policy, reference, reward_model, tokenizer, conv, gold, PPOSettings(), seed=10_000
            ),
        }

    return evaluate


def _lr(args: argparse.Namespace, lr: float) -> float:
    return lr * args.lora_lr_scale if args.lora_r else lr


def _peft(args: argparse.Namespace) -> Any:
    """TRL's side of --lora: the same adapters as ours' --lora-r."""
    if not args.lora_r:
        return None
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip


def _ours_lora(args: argparse.Namespace) -> dict[str, Any]:
    """Ours' side of --lora (every stage's --lora-r options)."""
    return dict(lora_r=args.lora_r, lora_alpha=float(args.lora_alpha), lora_dropout=0.0,
                lora_targets="all-linear")  # fmt: skip


def _trl_done(trainer: Any) -> tuple[Any, float]:
    """(the trained model, adapters merged; its last logged training loss)."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, float(losses[-1]) if losses else float("nan")


def _ours_done(run: Path) -> tuple[Any, float]:
    """(the run's model, adapters merged; its last epoch's / step's training loss)."""
    from selfsup.lm.alignment.rlhf import load_policy

    loss = float("nan")
    metrics = run / "metrics.csv"
    if metrics.is_file():
        with open(metrics, newline="") as f:
            rows = list(csv.DictReader(f))
        key = next((k for k in ("train_loss", "grpo/loss") if rows and k in rows[-1]), None)
        loss = float(rows[-1][key]) if key else loss
    return load_policy(run)[1], loss


def trl_sft(work: Path, out: Path, args: argparse.Namespace) -> tuple[Any, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    base = work / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    rows = [json.loads(line) for line in _sft_data(work, args).read_text().splitlines()]
    config = SFTConfig(
        output_dir=str(out), learning_rate=_lr(args, args.sft_lr),
        per_device_train_batch_size=args.sft_batch_size, num_train_epochs=args.sft_epochs,
        max_length=args.sft_max_length, assistant_only_loss=True, packing=False,
        gradient_checkpointing=False, use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", seed=args.seed, logging_steps=10, lr_scheduler_type="cosine",
        warmup_steps=10, weight_decay=0.0, max_grad_norm=1.0,
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=_peft(args))  # fmt: skip
    trainer.train()
    return _trl_done(trainer)


def ours_sft(work: Path, out: Path, args: argparse.Namespace) -> tuple[Any, float]:
    from selfsup.lm.alignment.sft import sft
    from selfsup.lm.options import TuneConfig

    run = sft(TuneConfig(
        init=str(work / "base"), data=str(_sft_data(work, args)), out=str(out),
        epochs=args.sft_epochs, lr=_lr(args, args.sft_lr), batch_size=args.sft_batch_size,
        max_length=args.sft_max_length, warmup_steps=10, val_fraction=0.0, seed=args.seed,
        accelerator="cpu", progress=False, **_ours_lora(args),
    ))  # fmt: skip
    return _ours_done(run)


def trl_grpo(work: Path, out: Path, args: argparse.Namespace) -> tuple[Any, float]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from selfsup.lm.alignment.rlhf import load_policy, load_reward_model
    from selfsup.lm.alignment.rollout import encode_prompts, position_ids, suppressed_tokens
    from selfsup.lm.data.chat_data import collate

    tokenizer, policy = load_policy(work / "sft")
    reward_model = load_reward_model(work / "rm", tokenizer)
    conv, _ = _prompts(work / "data" / "rl.jsonl")
    end = tokenizer.eos_token_id

    @torch.no_grad()
    def reward(prompts, completions, completion_ids, **_: Any) -> list[float]:
        rows = []  # score the tokens ours scores: the rendered prompt, the answer's ids
        for p, ids in zip(prompts, completion_ids, strict=True):
            prompt_ids = encode_prompts(tokenizer, [p])["input_ids"][0].tolist()
            rows.append((prompt_ids + list(ids), end in ids))
        batch = collate([(r[0], r[0]) for r in rows], tokenizer.pad_token_id)
        scores = reward_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids(batch["attention_mask"]),
        ).logits[:, 0]
        return [float(s) if ended else args.no_end_score
                for s, (_, ended) in zip(scores, rows, strict=True)]  # fmt: skip

    dataset = Dataset.from_list([{"prompt": c} for c in conv])
    per_step = args.prompts_per_step * args.group_size
    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=per_step,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        learning_rate=_lr(args, args.lr), beta=args.beta, epsilon=0.2, loss_type="grpo",
        max_steps=args.iterations, temperature=1.0, top_k=0, top_p=1.0, use_cpu=True, bf16=False,
        report_to="none", save_strategy="no", logging_steps=max(1, args.iterations // 4),
        seed=args.seed, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        generation_kwargs={"suppress_tokens": list(suppressed_tokens(tokenizer))},
        disable_dropout=True,
    )  # fmt: skip
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=_peft(args))  # fmt: skip
    trainer.train()
    return _trl_done(trainer)


def ours_grpo(work: Path, out: Path, args: argparse.Namespace) -> tuple[Any, float]:
    from selfsup.lm.alignment.grpo import Options as GRPOConfig
    from selfsup.lm.alignment.grpo import grpo

    run = grpo(GRPOConfig(
        policy=str(work / "sft"), reward=str(work / "rm"), prompts=str(work / "data" / "rl.jsonl"),
        out=str(out), iterations=args.iterations, eval_every=args.iterations, eval_samples=8,
        prompts_per_iteration=args.prompts_per_step, group_size=args.group_size,
        minibatch=args.prompts_per_step * args.group_size, lr=_lr(args, args.lr), beta=args.beta,
        max_new_tokens=args.max_new_tokens, no_end_score=args.no_end_score, seed=args.seed,
        accelerator="cpu", progress=False, **_ours_lora(args),
    ))  # fmt: skip
    return _ours_done(run)


def _pairs(rankings: Path) -> list[dict]:
    from selfsup.lm.alignment.dpo import preference_pairs
    from selfsup.lm.data.conversations import read_rankings

    pairs, _ = preference_pairs(read_rankings(rankings))
    return [{"prompt": p, "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in pairs]  # fmt: skip


def trl_dpo(work: Path, out: Path, args: argparse.Namespace) -> tuple[Any, float]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from selfsup.lm.alignment.rlhf import load_policy

    tokenizer, policy = load_policy(work / "sft")
    config = DPOConfig(
        output_dir=str(out), beta=args.dpo_beta, learning_rate=_lr(args, args.dpo_lr),
        per_device_train_batch_size=args.dpo_batch_size, num_train_epochs=1, max_length=96,
        use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=args.seed,
        logging_steps=10, loss_type=["sigmoid"], lr_scheduler_type="cosine", warmup_steps=10,
        weight_decay=0.0, max_grad_norm=1.0, disable_dropout=True,
    )  # fmt: skip
    data = Dataset.from_list(_pairs(_rankings(work, args)))
    trainer = DPOTrainer(model=policy, args=config, train_dataset=data,
                         processing_class=tokenizer, peft_config=_peft(args))  # fmt: skip
    trainer.train()
    return _trl_done(trainer)


def ours_dpo(work: Path, out: Path, args: argparse.Namespace) -> tuple[Any, float]:
    from selfsup.lm.alignment.dpo import Options as DPOConfig
    from selfsup.lm.alignment.dpo import dpo

    run = dpo(DPOConfig(
        init=str(work / "sft"), data=str(_rankings(work, args)), out=str(out), epochs=1,
        lr=_lr(args, args.dpo_lr), batch_size=args.dpo_batch_size, beta=args.dpo_beta,
        max_length=96, val_fraction=0.0, seed=args.seed, accelerator="cpu", progress=False,
        **_ours_lora(args),
    ))  # fmt: skip
    return _ours_done(run)


RUNS = {"sft": (ours_sft, trl_sft), "dpo": (ours_dpo, trl_dpo), "grpo": (ours_grpo, trl_grpo)}
COLUMNS = ("wall_s", "cpu_s", "held_out_loss", "train_loss", "gold", "proxy", "kl")


def table(rows: list[dict]) -> str:
    """Mean ± std over seeds per (method, adapters, trainer), and ours / TRL's wall time."""
    lines = [
        "| method | adapters | trainer | seeds | wall (s) | CPU (s) | held-out loss | train loss | "
        "gold | proxy | KL from SFT (nats) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for method, adapters in dict.fromkeys((r["method"], r["adapters"]) for r in rows):
        walls, cpus = {}, {}
        for who in ("selfsup", "TRL"):
            rs = [r for r in rows if (r["method"], r["adapters"], r["trainer"]) ==
                  (method, adapters, who)]  # fmt: skip
            if not rs:
                continue
            m = {k: (np.mean([r[k] for r in rs]), np.std([r[k] for r in rs])) for k in COLUMNS}
            walls[who] = np.sum([r["wall_s"] for r in rs])
            cpus[who] = np.sum([r["cpu_s"] for r in rs])
            lines.append(
                f"| {method} | {adapters} | {who} | {len(rs)} | {m['wall_s'][0]:.1f} ± "
                f"{m['wall_s'][1]:.1f} | {m['cpu_s'][0]:.1f} | {m['held_out_loss'][0]:.3f} | "
                f"{m['train_loss'][0]:.3f} | "
                f"{m['gold'][0]:.3f} ± {m['gold'][1]:.3f} | {m['proxy'][0]:.2f} | "
                f"{m['kl'][0]:.2f} ± {m['kl'][1]:.2f} |"
            )
        if len(walls) == 2:
            ratios.append(f"{method} {adapters}: ours / TRL's = "
                          f"{walls['selfsup'] / walls['TRL']:.2f} (wall), "
                          f"{cpus['selfsup'] / cpus['TRL']:.2f} (CPU)")  # fmt: skip
    return "\n".join([*lines, "", *ratios])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="alignment_frontier.py's --work folder "
                        "(its pipeline is built there when missing)")  # fmt: skip
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2",
                        help="the pipeline's model, when it is built here")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="the quick pipeline, 2 SFT epochs, 12 GRPO steps")  # fmt: skip
    parser.add_argument("--methods", help="comma list of sft,dpo,grpo (default: all three; "
                        "gpt2: dpo,grpo)")  # fmt: skip
    parser.add_argument("--lora", action="store_true", help="also with LoRA adapters, both sides")
    parser.add_argument("--lora-r", type=int, default=16, help="--lora: adapter rank")
    parser.add_argument("--lora-alpha", type=int, default=32, help="--lora: alpha (TRL's 32)")
    parser.add_argument("--lora-lr-scale", type=float, default=10.0,
                        help="--lora: every learning rate times this, both sides")  # fmt: skip
    parser.add_argument("--sft-epochs", type=int, help="default: the pipeline's Llama SFT's")
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--sft-batch-size", type=int, default=16)
    parser.add_argument("--sft-max-length", type=int, default=64)
    parser.add_argument("--iterations", type=int, help="GRPO steps (default 24; --quick 12)")
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
    scale = frontier.QUICK if args.quick else frontier.FULL
    args.sft_epochs = args.sft_epochs or (2 if args.quick else scale["llama_sft_epochs"])
    args.iterations = args.iterations or (12 if args.quick else 24)
    methods = (args.methods or ("sft,dpo,grpo" if args.arch == "llama" else "dpo,grpo")).split(",")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    frontier.build_pipeline(work, scale, args.arch)
    if "sft" in methods and not (work / "base" / "config.json").is_file():
        raise SystemExit("sft is compared on --arch llama (a random-initialised HF folder in "
                         "WORK/base); the GPT-2 pipeline's base is a selfsup run")  # fmt: skip
    evaluate = _evaluate(work, args.eval_prompts)
    variants = [0, args.lora_r] if args.lora else [0]
    rows: list[dict] = []
    args.warm = False
    if not args.no_warmup:  # one untimed call of each trainer (small data; GRPO 4 steps)
        warm = argparse.Namespace(**{**vars(args), "seed": 0, "iterations": 4, "warm": True,
                                     "sft_epochs": 1})  # fmt: skip
        for method in methods:
            for r in variants:
                for who, train in zip(("selfsup", "TRL"), RUNS[method], strict=True):
                    out = work / f"warmup-{method}-{who.lower()}"
                    train(work, out, argparse.Namespace(**{**vars(warm), "lora_r": r}))
                    shutil.rmtree(out, ignore_errors=True)
    for seed in [int(x) for x in args.seeds.split(",")]:
        for method in methods:
            for r in variants:
                run_args = argparse.Namespace(**{**vars(args), "seed": seed, "lora_r": r})
                adapters = f"LoRA r={r}" if r else "none"
                for who, train in zip(("selfsup", "TRL"), RUNS[method], strict=True):
                    out = work / f"compare-{method}-r{r}-{who.lower()}-s{seed}"
                    shutil.rmtree(out, ignore_errors=True)
                    torch.manual_seed(seed)
                    start, cpu = time.perf_counter(), time.process_time()
                    policy, loss = train(work, out, run_args)
                    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                    rows.append({"method": method.upper(), "adapters": adapters, "trainer": who,
                                 "seed": seed, "wall_s": wall, "cpu_s": cpu, "train_loss": loss,
                                 **evaluate(policy)})  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
                    (work / "trl_compare.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
