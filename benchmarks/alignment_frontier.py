"""Gold reward against KL(policy || SFT) for best-of-n, PPO, DPO, SimPO, KTO, GRPO and its variants.

Builds the offline arithmetic pipeline of docs/rlhf.md (pretrained GPT -> SFT -> simulated
labels -> reward model) in --work, then runs every method from the same SFT model with its main
knob swept over seeds, and measures each policy the same way on the same held-out prompts:
one sampled answer per prompt, gold score, proxy reward, and KL(policy || SFT) estimated from
those samples (the per-answer sum of log π - log π_SFT; `rlhf.evaluate_policy`). Best-of-n
cannot be scored token by token: its KL is estimated from the pool's empirical answer
distribution (`best_of_n_kl`), printed beside the usual bound log n - (n-1)/n.

    python benchmarks/alignment_frontier.py --quick --work /tmp/frontier   # minutes on a CPU
    python benchmarks/alignment_frontier.py --work frontier                # task A of the docs
    python benchmarks/alignment_frontier.py --quick --arch llama --work /tmp/frontier-llama
    python benchmarks/alignment_frontier.py --work frontier --methods grpo,dr-grpo,dapo,gspo \
        --betas 0.2                        # GRPO's loss variants beside plain GRPO at one β

`--methods` also takes GRPO_VARIANTS: Dr GRPO, DAPO, GSPO (GRPO's settings otherwise), GRPO
scored by the arithmetic checker and format reward of docs/examples/arithmetic_rewards.py as
--reward-fn (no reward model; together they are the gold score) against --reward-from gold, and
GRPO with the length reward `short` beside the reward model (WORK/length.md: the held-out mean
answer length of the SFT model, GRPO and GRPO + short).

--arch llama builds the same pipeline on a random-initialised Hugging Face Llama instead of the
pretrained GPT-2 (`llama_base`: about the GPT-2's size, RoPE, grouped-query attention, SwiGLU;
the pipeline's character tokenizer with Llama 3's special tokens and a Jinja chat template of its
own, so every stage renders through the model's template, not selfsup's markers); it is not
pretrained: SFT (--sft-epochs) teaches it the task from random weights.

Writes WORK/frontier.csv (every point), WORK/frontier.md (the table) and a figure (--figure).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.cli.main import main as cli

# Task A of docs/rlhf.md ("Five seeds"), and a small version of it that runs in minutes.
FULL: dict[str, Any] = dict(
    task=["--num-prompts", "1024"],
    gpt=["--steps", "1500", "--block-size", "64", "--batch-size", "32"],
    sft=["--epochs", "2", "--lr", "3e-4", "--batch-size", "16", "--max-length", "96"],
    label_k=8,
    reward=["--epochs", "2", "--lr", "1e-4", "--batch-size", "8", "--max-length", "96"],
    eval_prompts=512, pool=64, ns=[1, 2, 3, 4, 6, 8, 12, 16, 32, 64],
    ppo=dict(betas=[0.05, 0.2, 1.0], iterations=120, eval_every=20, rollouts=32, minibatch=16,
             lr=1e-5),
    grpo=dict(betas=[0.0, 0.04, 0.2], iterations=120, eval_every=20, prompts_per_iteration=4,
              group_size=8, minibatch=16, lr=1e-5),
    dpo=dict(betas=[0.03, 0.1, 0.3, 1.0], epochs=1, lr=1e-5, batch_size=16),
    simpo=dict(betas=[2.0, 10.0], epochs=1, lr=1e-5, batch_size=16),
    kto=dict(betas=[0.1, 0.3, 1.0], epochs=1, lr=1e-5, batch_size=32),
    seeds=[0, 1, 2],
    llama_sft_epochs=6,
)  # fmt: skip
QUICK: dict[str, Any] = dict(
    task=["--num-prompts", "256", "--sft", "1000", "--max-operand", "20"],
    gpt=["--steps", "500", "--block-size", "64", "--batch-size", "32", "--n-layer", "2",
         "--n-embd", "64", "--eval-interval", "250", "--final-eval-batches", "20"],
    sft=["--epochs", "2", "--lr", "1e-3", "--batch-size", "16", "--max-length", "64"],
    label_k=4,
    reward=["--epochs", "2", "--lr", "3e-4", "--batch-size", "8", "--max-length", "64"],
    eval_prompts=128, pool=32, ns=[1, 2, 4, 8, 16, 32],
    ppo=dict(betas=[0.05, 0.2, 1.0], iterations=48, eval_every=12, rollouts=16, minibatch=8,
             lr=5e-5),
    grpo=dict(betas=[0.0, 0.04, 0.2], iterations=48, eval_every=12, prompts_per_iteration=2,
              group_size=8, minibatch=8, lr=5e-5),
    dpo=dict(betas=[0.1, 0.3, 1.0], epochs=1, lr=5e-5, batch_size=16),
    simpo=dict(betas=[2.0, 10.0], epochs=1, lr=5e-5, batch_size=16),
    kto=dict(betas=[0.1, 0.3, 1.0], epochs=1, lr=5e-5, batch_size=32),
    seeds=[0, 1, 2],
    llama_sft_epochs=6,
)  # fmt: skip


# The Llama of --arch llama: Llama 3's role tokens and template (its `{% generation %}` markers
# tell TRL's SFTTrainer the assistant's tokens; they render nothing), <|eot_id|> ends a turn.
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|eot_id|>"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}"
)
LLAMA_SPECIAL = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                 "pad_token": "<|finetune_right_pad_id|>"}  # fmt: skip
LLAMA_ROLES = ["<|start_header_id|>", "<|end_header_id|>"]
# about the quick GPT-2's size (2 x 64, 4 heads): the SwiGLU's three matrices of 176 ~ GPT-2's
# two of 256; two key/value heads (grouped-query attention); tied embeddings as GPT-2's
LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=176, max_position_embeddings=128,
             tie_word_embeddings=True)  # fmt: skip


def llama_base(folder: Path, corpus: Path, size: dict[str, int] | None = None) -> Path:
    """A random-initialised Llama HF folder: the pipeline's character tokenizer (the corpus's
    characters and printable ASCII) with Llama 3's special tokens and LLAMA_TEMPLATE."""
    import string

    from transformers import AutoModelForCausalLM, LlamaConfig

    from selfsup.core.tokenizer import train_tokenizer

    texts = [corpus.read_text(), string.printable]
    tokenizer = train_tokenizer(texts, "char", special_tokens=[*LLAMA_SPECIAL.values(),
                                                              *LLAMA_ROLES])  # fmt: skip
    tokenizer.add_special_tokens({**LLAMA_SPECIAL, "additional_special_tokens": LLAMA_ROLES})
    tokenizer.chat_template = LLAMA_TEMPLATE
    torch.manual_seed(0)
    ids = {f"{k}_id": tokenizer.convert_tokens_to_ids(v) for k, v in LLAMA_SPECIAL.items()}
    config = LlamaConfig(vocab_size=len(tokenizer), **ids, **(size or LLAMA))
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _run(argv: list[str]) -> None:
    print("$ selfsup " + " ".join(argv), flush=True)
    if cli(argv) != 0:
        raise SystemExit(f"failed: selfsup {' '.join(argv)}")


def build_pipeline(work: Path, scale: dict[str, Any], arch: str = "gpt2") -> dict[str, Path]:
    """The task's files, base model (GPT-2 pretrained on the corpus, or a random Llama), SFT
    model, rankings and reward model (reused when present)."""
    data, gpt, sft, rm = work / "data", work / "gpt", work / "sft", work / "rm"
    if not (data / "eval.jsonl").is_file():
        _run(["lm", "arithmetic", str(data), *scale["task"]])
    sft_args = scale["sft"]
    if arch == "llama":
        gpt = work / "base"
        if not (gpt / "config.json").is_file():
            llama_base(gpt, data / "corpus.txt")
        sft_args = [*sft_args, "--epochs", str(scale["llama_sft_epochs"])]  # from random weights
    elif not (gpt / "hf").is_dir():
        corpus = str(data / "corpus.txt")
        _run(["lm", "pretrain", "gpt", "--data", corpus, "--tokenizer", "char", *scale["gpt"],
              "--accelerator", "cpu", "--no-progress", "--out", str(gpt)])  # fmt: skip
    if not (sft / "hf").is_dir():
        _run(["lm", "sft", "--init", str(gpt), "--data", str(data / "sft.jsonl"), *sft_args,
              "--accelerator", "cpu", "--no-progress", "--out", str(sft)])  # fmt: skip
    rankings = work / "rankings.jsonl"
    if not rankings.is_file():
        _run(["lm", "label", str(sft), "--prompts", str(data / "label.jsonl"), "--k",
              str(scale["label_k"]), "-o", str(rankings)])  # fmt: skip
    if not (rm / "hf").is_dir():
        _run(["lm", "reward", "--init", str(sft), "--data", str(rankings), *scale["reward"],
              "--accelerator", "cpu", "--no-progress", "--out", str(rm)])  # fmt: skip
    return {"data": data, "base": gpt, "sft": sft, "rm": rm, "rankings": rankings}


def _held_out(paths: dict[str, Path], scale: dict[str, Any]):  # type: ignore[no-untyped-def]
    """(prompts, gold scorer, tokenizer, SFT policy, reward model) of the held-out evaluation."""
    from selfsup.lm.alignment.rlhf import gold_fn, load_policy, load_prompts, load_reward_model

    conv, records = load_prompts(str(paths["data"] / "eval.jsonl"))
    conv, records = conv[: scale["eval_prompts"]], records[: scale["eval_prompts"]]
    tokenizer, sft = load_policy(paths["sft"])
    return (
        conv,
        gold_fn("arithmetic", records),
        tokenizer,
        sft,
        load_reward_model(paths["rm"], tokenizer),
    )


def _evaluator(paths: dict[str, Path], scale: dict[str, Any]):
    """evaluate(policy) -> proxy, gold, KL on the held-out prompts, as lm rlhf's eval.csv."""
    from selfsup.lm.alignment.rlhf import evaluate_policy, load_policy
    from selfsup.lm.options import PPOSettings

    conv, gold, tokenizer, reference, reward_model = _held_out(paths, scale)

    def evaluate(policy_dir: Path) -> dict[str, float]:
        _, policy = load_policy(policy_dir)
        return evaluate_policy(policy, reference, reward_model, tokenizer, conv, gold,
                               PPOSettings(), seed=10_000)  # fmt: skip

    return evaluate


def run_best_of_n(paths: dict[str, Path], scale: dict[str, Any], seed: int) -> list[dict]:
    from selfsup.lm.alignment.rlhf import best_of_n_kl, best_of_n_mean

    start = time.perf_counter()
    proxy, golds = _pool(paths, scale, seed)
    wall = time.perf_counter() - start
    rows = []
    for n in scale["ns"]:
        rows.append(dict(
            method="best-of-n", knob=f"n={n}", seed=seed, step=n, kl=best_of_n_kl(proxy, n),
            kl_bound=float(np.log(n) - (n - 1) / n), proxy=best_of_n_mean(proxy, proxy, n),
            gold=best_of_n_mean(proxy, golds, n), wall_s=wall * n / scale["pool"],
            train_samples=0, samples_per_answer=n,
        ))  # fmt: skip
    return rows


@torch.no_grad()
def _pool(paths, scale, seed) -> tuple[np.ndarray, np.ndarray]:
    from selfsup.lm.alignment.rollout import decode_responses, reward_scores, sample

    conv, gold, tokenizer, policy, reward_model = _held_out(paths, scale)
    proxy = np.zeros((len(conv), scale["pool"]))
    golds = np.zeros_like(proxy)
    for j in range(scale["pool"]):
        for s in range(0, len(conv), 64):
            r = sample(
                policy, tokenizer, conv[s : s + 64], 24, 1.0, 0, seed * 100_000 + 1000 * j + s
            )
            score = reward_scores(reward_model, r)
            proxy[s : s + len(r.ended), j] = torch.where(r.ended, score, -1.0).numpy()
            for i, a in enumerate(decode_responses(tokenizer, r)):
                golds[s + i, j] = gold(s + i, a)
    return proxy, golds


def run_ppo(paths, scale, seed, beta, work) -> list[dict]:
    from selfsup.lm.alignment.rlhf import Options as RLHFConfig
    from selfsup.lm.alignment.rlhf import rlhf

    s = scale["ppo"]
    out = work / f"ppo-b{beta}-s{seed}"
    config = RLHFConfig(
        policy=str(paths["sft"]), reward=str(paths["rm"]), prompts=str(paths["data"] / "rl.jsonl"),
        eval_prompts=str(paths["data"] / "eval.jsonl"), gold="arithmetic", out=str(out),
        iterations=s["iterations"], eval_every=s["eval_every"], eval_samples=scale["eval_prompts"],
        rollouts=s["rollouts"], minibatch=s["minibatch"], lr=s["lr"], beta=beta, max_kl=10.0,
        seed=seed, accelerator="cpu", progress=False,
    )  # fmt: skip
    return _trained("PPO", f"β={beta}", seed, out, lambda: rlhf(config), s["rollouts"])


REWARDS = Path(__file__).resolve().parents[1] / "docs" / "examples" / "arithmetic_rewards.py"
# GRPO's variants (issue 35), each plain GRPO's run (same SFT and reward model, settings, β and
# seeds) with only these options changed: --methods NAME -> (method on the frontier, options).
GRPO_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "grpo": ("GRPO", {}),
    "dr-grpo": ("Dr GRPO", dict(loss_type="dr-grpo", scale_rewards="none")),
    "dapo": ("DAPO", dict(loss_type="dapo", epsilon_high=0.28, skip_flat_groups=True)),
    "gspo": ("GSPO", dict(importance_sampling="sequence")),
    "grpo-fn": ("GRPO checker fn", dict(reward="", reward_fn=f"{REWARDS}:correct,"
                                        f"{REWARDS}:one_short_sentence")),
    "grpo-gold": ("GRPO gold", dict(reward_from="gold")),
    "grpo-short": ("GRPO + short", dict(reward_fn=f"{REWARDS}:short", reward_weights="1,0.2")),
}  # fmt: skip


def run_grpo(paths, scale, seed, beta, work, variant: str = "grpo") -> list[dict]:
    from selfsup.lm.alignment.grpo import Options as GRPOConfig
    from selfsup.lm.alignment.grpo import grpo

    s = scale["grpo"]
    method, changes = GRPO_VARIANTS[variant]
    out = work / f"{variant}-b{beta}-s{seed}"
    config = GRPOConfig(**{**dict(
        policy=str(paths["sft"]), reward=str(paths["rm"]), prompts=str(paths["data"] / "rl.jsonl"),
        eval_prompts=str(paths["data"] / "eval.jsonl"), gold="arithmetic", out=str(out),
        iterations=s["iterations"], eval_every=s["eval_every"], eval_samples=scale["eval_prompts"],
        prompts_per_iteration=s["prompts_per_iteration"], group_size=s["group_size"],
        minibatch=s["minibatch"], lr=s["lr"], beta=beta, max_kl=10.0, seed=seed,
        accelerator="cpu", progress=False), **changes})  # fmt: skip
    per_iteration = s["prompts_per_iteration"] * s["group_size"]
    return _trained(method, f"β={beta}", seed, out, lambda: grpo(config), per_iteration)


@torch.no_grad()
def answer_chars(paths: dict[str, Path], scale: dict[str, Any], policy_dir: Path) -> float:
    """Mean length in characters of one sampled answer per held-out prompt (the evaluation's
    prompts and seed)."""
    from selfsup.lm.alignment.rlhf import load_policy, load_prompts
    from selfsup.lm.alignment.rollout import decode_responses, sample

    conv, _ = load_prompts(str(paths["data"] / "eval.jsonl"))
    conv = conv[: scale["eval_prompts"]]
    tokenizer, policy = load_policy(policy_dir)
    lengths = []
    for s in range(0, len(conv), 32):
        r = sample(policy, tokenizer, conv[s : s + 32], 24, 1.0, 0, 10_000 + s)
        lengths += [len(a.strip()) for a in decode_responses(tokenizer, r)]
    return float(np.mean(lengths))


def length_table(paths, work: Path, scale, seeds: list[int], beta: float) -> str:
    """SFT, GRPO and GRPO + short (weight 0.2): held-out mean answer characters, and the mean
    answer tokens of the last training iteration (metrics.csv), per seed."""
    sft = answer_chars(paths, scale, paths["sft"])
    lines = ["| policy | seed | held-out answer chars | last iteration's answer tokens |",
             "|---|---|---|---|", f"| SFT | — | {sft:.1f} | — |"]  # fmt: skip
    for variant in ("grpo", "grpo-short"):
        for seed in seeds:
            out = work / f"{variant}-b{beta}-s{seed}"
            if not (out / "hf").is_dir():
                continue
            with open(out / "metrics.csv", newline="") as f:
                tokens = [r["answer_tokens"] for r in csv.DictReader(f) if r.get("answer_tokens")]
            chars = answer_chars(paths, scale, out / "hf")
            lines.append(f"| {GRPO_VARIANTS[variant][0]} β {beta} | {seed} | {chars:.1f} | "
                         f"{float(tokens[-1]):.1f} |")  # fmt: skip
    return "\n".join(lines)


def _trained(method, knob, seed, out, train, per_iteration) -> list[dict]:
    """Train (unless done), then read its eval.csv: one point per evaluation."""
    if not (out / "eval.csv").is_file() or not (out / "hf").is_dir():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        train()
        (out / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    wall = float((out / "wall_s.txt").read_text())
    with open(out / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    last = int(rows[-1]["iteration"])
    return [
        dict(method=method, knob=knob, seed=seed, step=int(r["iteration"]), kl=float(r["kl"]),
             kl_bound=float("nan"), proxy=float(r["proxy"]), gold=float(r["gold"]),
             wall_s=wall * int(r["iteration"]) / max(1, last),
             train_samples=per_iteration * int(r["iteration"]), samples_per_answer=1)
        for r in rows
    ]  # fmt: skip


# The offline stages: (name on the frontier, entry function); each learns from the rankings
# (SimPO as DPO's pairs with γ at its default; KTO each pair's chosen answer desirable and its
# rejected one undesirable), one epoch, its β swept. KTO's batch counts answers (32 = 16 pairs).
OFFLINE = {"dpo": "DPO", "simpo": "SimPO", "kto": "KTO"}


def run_offline(paths, scale, seed, name, beta, work, evaluate) -> list[dict]:
    from importlib import import_module

    stage = import_module(f"selfsup.lm.alignment.{name}")
    s = scale[name]
    out = work / f"{name}-b{beta}-s{seed}"
    if not (out / "result.json").is_file():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        config = stage.Options(init=str(paths["sft"]), data=str(paths["rankings"]), out=str(out),
                               epochs=s["epochs"], lr=s["lr"], batch_size=s["batch_size"],
                               beta=beta, max_length=96, seed=seed, accelerator="cpu",
                               progress=False)  # fmt: skip
        getattr(stage, name)(config)
        wall = time.perf_counter() - start
        (out / "result.json").write_text(json.dumps({"wall_s": wall, **evaluate(out)}))
    r = json.loads((out / "result.json").read_text())
    return [dict(method=OFFLINE[name], knob=f"β={beta}", seed=seed, step=s["epochs"], kl=r["kl"],
                 kl_bound=float("nan"), proxy=r["proxy"], gold=r["gold"], wall_s=r["wall_s"],
                 train_samples=0, samples_per_answer=1)]  # fmt: skip


def _typed(row: dict[str, str]) -> dict:
    """A frontier.csv row with its numbers as numbers."""
    out: dict = dict(row)
    for k in ("seed", "step", "train_samples", "samples_per_answer"):
        out[k] = int(row[k])
    for k in ("kl", "kl_bound", "proxy", "gold", "wall_s"):
        out[k] = float(row[k])
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (method, knob, step)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["knob"], r["step"]), []).append(r)
    out = []
    for (method, knob, step), rs in groups.items():

        def stat(k: str, rs: list[dict] = rs) -> tuple[float, float]:
            v = np.array([r[k] for r in rs], dtype=float)
            return float(v.mean()), float(v.std())

        out.append(dict(method=method, knob=knob, step=step, seeds=len(rs),
                        kl=stat("kl"), gold=stat("gold"), proxy=stat("proxy"),
                        kl_bound=rs[0]["kl_bound"], wall_s=stat("wall_s")[0],
                        train_samples=rs[0]["train_samples"],
                        samples_per_answer=rs[0]["samples_per_answer"]))  # fmt: skip
    return out


def table(summary: list[dict]) -> str:
    lines = [
        "| method | knob | iteration / n | KL from SFT (nats) | gold | proxy | wall (s) | "
        "training samples | samples per answer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        kl = f"{s['kl'][0]:.2f} ± {s['kl'][1]:.2f}"
        if s["kl_bound"] == s["kl_bound"]:  # best-of-n: the bound beside the estimate
            kl += f" (bound {s['kl_bound']:.2f})"
        lines.append(
            f"| {s['method']} | {s['knob']} | {s['step']} | {kl} | "
            f"{s['gold'][0]:.3f} ± {s['gold'][1]:.3f} | {s['proxy'][0]:.2f} | "
            f"{s['wall_s']:.0f} | {s['train_samples']} | {s['samples_per_answer']} |"
        )
    return "\n".join(lines)


def figure(summary: list[dict], path: Path, title: str, kl_max: float = 0.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"best-of-n": "o", "PPO": "s", "DPO": "D", "SimPO": "v", "KTO": "P", "GRPO": "^",
               "Dr GRPO": "<", "DAPO": ">", "GSPO": "X", "GRPO checker fn": "*",
               "GRPO gold": "h", "GRPO + short": "d"}  # fmt: skip
    for method, knob in dict.fromkeys((s["method"], s["knob"]) for s in summary):
        pts = sorted((s for s in summary if s["method"] == method and s["knob"] == knob),
                     key=lambda s: s["step"])  # fmt: skip
        if method == "best-of-n":
            continue
        label = f"{method} {knob}"
        beyond = [p["kl"][0] for p in pts if kl_max and p["kl"][0] > kl_max]
        if beyond:
            label += f" (KL {', '.join(f'{k:.0f}' for k in beyond)}: off the axis)"
        ax.errorbar([p["kl"][0] for p in pts], [p["gold"][0] for p in pts],
                    yerr=[p["gold"][1] for p in pts], marker=markers.get(method, "x"), capsize=2,
                    label=label)  # fmt: skip
    bon = sorted((s for s in summary if s["method"] == "best-of-n"), key=lambda s: s["step"])
    if bon:
        ax.plot([p["kl"][0] for p in bon], [p["gold"][0] for p in bon], "k-o",
                label="best-of-n (KL estimated)")  # fmt: skip
        ax.plot([p["kl_bound"] for p in bon], [p["gold"][0] for p in bon], "k:",
                label="best-of-n (KL bound)")  # fmt: skip
    if kl_max:
        ax.set_xlim(-0.05 * kl_max, kl_max)
    ax.set_xlabel("KL(policy || SFT), nats per answer (held-out prompts)")
    ax.set_ylabel("gold score")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="frontier", help="folder for the pipeline and runs")
    parser.add_argument("--quick", action="store_true", help="the small scale (minutes on a CPU)")
    parser.add_argument("--seeds", help="comma list (default: the scale's)")
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2",
                        help="the pipeline's model: GPT-2 pretrained on the corpus, or a "
                        "random-initialised Llama (`llama_base`)")  # fmt: skip
    parser.add_argument(
        "--methods",
        default="best-of-n,ppo,dpo,simpo,kto,grpo",
        help="comma list; also " + ",".join(list(GRPO_VARIANTS)[1:]),
    )
    parser.add_argument("--betas", help="comma list of β for every swept method (default: "
                        "each method's list of the scale)")  # fmt: skip
    parser.add_argument("--figure", help="write the figure here (e.g. docs/img/frontier.png)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--kl-max", type=float, default=0.0, help="figure: KL axis limit")
    parser.add_argument(
        "--from-csv",
        help="comma list of frontier.csv files (e.g. of runs split over processes): only the "
        "table and figure from them",
    )
    args = parser.parse_args()
    if args.from_csv:
        rows = []
        for path in args.from_csv.split(","):
            with open(path, newline="") as f:
                rows += [_typed(r) for r in csv.DictReader(f)]
        summary = summarise(rows)
        print(table(summary))
        if args.figure:
            seeds = sorted({r["seed"] for r in rows})
            figure(summary, Path(args.figure), f"gold vs KL, seeds {seeds}", args.kl_max)
        return
    torch.set_num_threads(args.threads)
    scale = QUICK if args.quick else FULL
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else scale["seeds"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = build_pipeline(work, scale, args.arch)
    print(f"pipeline ready in {time.perf_counter() - start:.0f} s", flush=True)
    held_out = len((paths["data"] / "eval.jsonl").read_text().splitlines())
    print(f"held-out prompts: {min(held_out, scale['eval_prompts'])}", flush=True)
    evaluate = _evaluator(paths, scale)
    methods = args.methods.split(",")
    rows: list[dict] = []

    def keep(new: list[dict]) -> None:  # every point on disk as soon as it is measured
        rows.extend(new)
        with open(work / "frontier.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    betas = [float(b) for b in args.betas.split(",")] if args.betas else None
    for seed in seeds:
        if "best-of-n" in methods:
            keep(run_best_of_n(paths, scale, seed))
        for beta in (betas or scale["ppo"]["betas"]) if "ppo" in methods else []:
            keep(run_ppo(paths, scale, seed, beta, work))
        for name in (m for m in OFFLINE if m in methods):
            for beta in betas or scale[name]["betas"]:
                keep(run_offline(paths, scale, seed, name, beta, work, evaluate))
        for variant in (v for v in GRPO_VARIANTS if v in methods):
            for beta in betas or scale["grpo"]["betas"]:
                keep(run_grpo(paths, scale, seed, beta, work, variant))
    if "grpo-short" in methods:
        text = "\n\n".join(length_table(paths, work, scale, seeds, beta)
                           for beta in betas or scale["grpo"]["betas"])  # fmt: skip
        (work / "length.md").write_text(text + "\n")
        print(text)
    summary = summarise(rows)
    text = table(summary)
    (work / "frontier.md").write_text(text + "\n")
    print(text)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.figure:
        scale_name = "quick scale" if args.quick else "task A"
        title = f"gold vs KL, {scale_name}, seeds {seeds}"
        figure(summary, Path(args.figure), title, args.kl_max)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
