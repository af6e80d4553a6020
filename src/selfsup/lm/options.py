"""The options of every `selfsup lm` training command, without torch.

The command line builds its parsers from these dataclasses, so `selfsup lm ... --help` and
usage errors stay instant; the modules that train import them from here (LMConfig, the options
every `selfsup lm pretrain KIND` but word2vec shares; each kind declares its own `Options` in its
file, read through `selfsup.lm.methods.PRETRAIN`). Only the standard library and
`selfsup.core` may be imported here (tests/test_lm_cli.py checks that torch is not).

Vocabulary shared with the image side: `--data` (the input file or folder), `--out` (the run
directory), `--resume RUN`, `--seed`, `--accelerator`, `--devices`, `--precision`,
`--progress/--no-progress`. Language models count training in `--steps` (sft and reward in
`--epochs`, rlhf in `--iterations`); image runs count `--epochs`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from selfsup.core.config import check_fields, check_range, option
from selfsup.core.errors import SelfsupError

PROGRESS_HELP = "progress bars (default: on a terminal; otherwise one line per validation)"
DEVICES_HELP = "number of devices or 'auto' (every GPU, one process each; one on a CPU)"
ONE_DEVICE_HELP = "1 or auto: this stage trains in one process, on one device"
PRECISION_HELP = "Lightning precision, e.g. bf16-mixed on a GPU"


def check_one_device(devices: str) -> None:
    """--devices of a stage that trains in one process: 1 or auto, anything else one line."""
    if str(devices) not in ("1", "auto"):
        raise SelfsupError(
            f"--devices {devices}: this stage trains in one process on one device (1 or auto); "
            "data-parallel training is built for `selfsup pretrain` and `selfsup lm pretrain`"
        )


@dataclass
class LMConfig:
    """Options every `selfsup lm pretrain KIND` shares; saved in RUN/config.yaml."""

    model: str = option("gpt", "model kind", cli=False)
    data: str | None = option(
        None, "the corpus: a .txt or .jsonl file, or a folder of them (required unless --resume)"
    )
    encoding: str = option("utf-8", "text encoding of the corpus files")
    text_field: str = option("text", "field holding the text in JSONL records")
    tokenizer: str = option("char", "char | bpe | a folder holding a tokenizer.json to reuse")
    vocab_size: int = option(8192, "bpe: vocabulary size")
    val_fraction: float = option(0.1, "last fraction of the tokens kept for validation")
    steps: int = option(
        2000, "optimisation steps (language models count steps, not epochs)", check=">=1"
    )
    batch_size: int = option(12, "sequences per batch", check=">=1")
    lr: float = option(1e-3, "peak learning rate (AdamW)", check=">0")
    min_lr_fraction: float = option(
        0.1, "the cosine decays to this fraction of --lr", check="[0,1]"
    )
    warmup_steps: int = option(100, "linear warm-up steps before the cosine decay", check=">=0")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)", check=">=0")
    beta2: float = option(0.99, "AdamW beta2", check="[0,1)")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)", check=">=0")
    eval_interval: int = option(250, "validate every N steps", check=">=1")
    eval_batches: int = option(20, "batches per periodic validation", check=">=1")
    final_eval_batches: int = option(200, "batches of the final validation estimate", check=">=1")
    init: str | None = option(None, "start from this local Hugging Face checkpoint folder")
    threads: int = option(
        0,
        "CPU threads of a CPU run (0: auto: 1 for a model under 5M parameters, whose small "
        "matrices lose more to thread hand-offs than they gain, else torch's count less the "
        "cores other processes keep busy)",
        check=">=0",
    )
    seed: int = option(0, "random seed (initialisation, batches)", check="seed")
    accelerator: str = option("auto", "cpu | gpu | auto (Lightning)")
    devices: str = option("auto", DEVICES_HELP)
    precision: str | None = option(
        None, "Lightning precision (default: bf16-mixed on GPU, else 32)", check="precision"
    )
    progress: bool | None = option(None, PROGRESS_HELP)
    out: str | None = option(None, "run directory (default runs/lm-KIND-CORPUS-TIMESTAMP)")
    resume: str | None = option(None, "continue the run in this directory from its last checkpoint")


@dataclass
class EngineOptions:
    """The engine of a stage after pretraining (shared by every stage that trains; each stage's
    file declares the rest of its options)."""

    seed: int = option(0, "random seed")
    accelerator: str = option("auto", "cpu | gpu | auto")
    devices: str = option(
        "1",
        "processes, one device each (gloo on a CPU, NCCL on GPUs); --batch-size stays the whole "
        "batch, split over them, so N processes train as one",
    )
    precision: str = option("32-true", "Lightning precision, e.g. bf16-mixed on a GPU")
    progress: bool | None = option(None, "progress bar (default: on a terminal)")


@dataclass
class LoraOptions:
    """LoRA adapters through peft (`selfsup.lm.models.lora`), shared by every stage that trains:
    with --lora-r R the base weights stay frozen and only rank-R adapters (and the chat markers'
    embedding rows) learn; the run saves the adapter, and the stages that need a frozen reference
    use the base with its adapters off instead of a second copy."""

    lora_r: int = option(0, "LoRA rank of the adapters (peft; 0: train every weight)", check=">=0")
    lora_alpha: float = option(
        0.0,
        "LoRA scale alpha, the update is alpha/r * BA (0: 2 x --lora-r, as TRL's 16/32)",
        check=">=0",
    )
    lora_dropout: float = option(
        0.05,
        "dropout on the adapters' input (TRL's default; dpo, kto, grpo, rlhf turn it off)",
        check="[0,1)",
    )
    lora_targets: str = option(
        "all-linear",
        "modules to adapt: a comma list of module names (e.g. c_attn,c_proj or q_proj,v_proj), "
        "or all-linear (every linear layer but the output layer, as peft)",
    )


# The shared options a stage's --help lists last, in this order (its own come first).
LISTED_LAST = (
    *(f.name for f in fields(LoraOptions)),
    "truncate",
    *(f.name for f in fields(EngineOptions)),
    "resume",
)


@dataclass
class TuneConfig(EngineOptions, LoraOptions):
    """Options shared by the stages that train on a file in epochs (`selfsup lm sft`, `reward`,
    `dpo`; same names in Python): the data, the run folder and posttrain's loop."""

    init: str = option(
        "",
        "the model to start from: a run directory or a local HF folder (required unless "
        "--resume RUN)",
    )
    data: str = option(
        "", "JSONL: conversations (sft) or rankings (reward) (required unless --resume RUN)"
    )
    out: str = option("", "run directory to write (not needed with --resume RUN)")
    epochs: int = option(
        3, "passes over the training data (sft and reward count epochs)", check=">=1"
    )
    batch_size: int = option(
        16, "conversations (sft) or ranked prompts (reward) per step", check=">=1"
    )
    lr: float = option(1e-4, "peak learning rate (AdamW, warm-up then cosine)", check=">0")
    weight_decay: float = option(0.0, "AdamW weight decay", check=">=0")
    warmup_steps: int = option(10, "linear warm-up steps", check=">=0")
    max_length: int = option(
        256,
        "tokens per conversation: longer ones are cut (sft: their end; reward: their start); a "
        "conversation beyond the model's context stops the command with one line naming its "
        "line (pass --max-length CONTEXT to cut there)",
        check=">=1",
    )
    pack: bool = option(False, "sft: pack conversations into blocks of --max-length tokens")
    val_fraction: float = option(0.1, "the last fraction of the file validates", check="[0,1)")
    seed: int = option(0, "random seed (order of the examples)")
    progress: bool | None = option(None, "progress bars (default: on a terminal)")
    resume: str | None = option(
        None,
        "continue the run in this directory from its last epoch (--init and --data default to "
        "the run's own)",
        nargs="?",
        const=True,  # the bare flag of before `--resume RUN`: the run in --out
        deprecated={"--no-resume": "leave it out (a new run is the default)"},
    )
    accumulate: int = option(
        1,
        "micro-batches per optimiser step (gradient accumulation; sft, reward, dpo, simpo): "
        "--batch-size stays the step's batch, cut into K that must divide it; less memory, the "
        "same step (each micro-batch weighs by its rows or tokens); steps, the schedule and "
        "checkpoints count optimiser steps",
        check=">=1",
    )


@dataclass
class OnlinePolicy:
    """The options PPO and GRPO share (`PPOSettings`, `lm grpo`): how the answers are sampled
    and scored, and the clipped update of the policy on them."""

    clip: float = option(0.2, "clip range of the policy ratio", check=">0")
    max_new_tokens: int = option(24, "longest answer in tokens", check=">=1")
    temperature: float = option(
        1.0,
        "sampling temperature of the answers (their log-probabilities use it too)",
        check=">0",
    )
    no_end_score: float = option(
        -1.0, "the score of an answer that never emits the end token", check="finite"
    )
    max_grad_norm: float = option(1.0, "gradient clipping norm", check=">0")
    accumulate: int = option(
        1,
        "micro-batches per optimiser step (gradient accumulation): each --minibatch is cut into "
        "K that must divide it, weighed by the minibatch's normaliser (its answers or tokens); "
        "less memory, the same update; ppo/updates counts optimiser steps",
        check=">=1",
    )


@dataclass
class PPOSettings(OnlinePolicy):
    """The knobs of PPO for language models (defaults after InstructGPT / TRL's PPO)."""

    rollouts: int = option(16, "answers sampled per iteration", check=">=1")
    minibatch: int = option(8, "answers per PPO update", check=">=1")
    ppo_epochs: int = option(4, "passes of PPO updates over each batch of answers", check=">=1")
    lr: float = option(1e-5, "learning rate of policy and value head (AdamW)", check=">0")
    beta: float = option(0.05, "KL penalty per token, beta * (log pi - log pi_ref)", check=">=0")
    value_clip: float = option(0.2, "clip range of the value update", check=">0")
    value_coef: float = option(0.1, "weight of the value loss", check=">=0")
    gamma: float = option(1.0, "discount of GAE", check="[0,1]")
    lam: float = option(0.95, "lambda of GAE", check="[0,1]")
    adaptive_kl: float = option(
        0.0,
        "adapt beta to hold the rollouts' KL from the reference near this many nats per answer "
        "(Ziegler et al. 2019; 0: a fixed --beta)",
        check=">=0",
    )
    kl_horizon: int = option(
        10000, "adaptive KL: the horizon (in answers) of beta's adaptation", check=">=1"
    )
    target_kl: float = option(
        0.0,
        "end an iteration's PPO epochs early once a minibatch's approximate KL from the "
        "rollouts' policy exceeds this (0: never)",
        check=">=0",
    )


@dataclass
class PromptFit:
    """What a stage that samples answers does with a prompt too long for the context."""

    truncate: bool = option(
        False,
        "cut a prompt that leaves no room for --max-new-tokens in the model's context from the "
        "left (oldest turns first, then the start of its text), as TRL's max_prompt_length; "
        "without it such a prompt stops the command with one line naming its line in the file",
    )


TRUNCATE_HELP = fields(PromptFit)[0].metadata["help"]


@dataclass
class OnlineOptions(EngineOptions, PromptFit, LoraOptions):
    """Options shared by the stages that sample from the policy and score the answers
    (`selfsup lm rlhf`, `grpo`): the models, the prompts, the run folder, the evaluations."""

    policy: str = option(
        "", "the SFT run (or local HF folder) to start from; also the reference", required=True
    )
    reward: str = option("", "the reward-model run (or local HF folder)", required=True)
    prompts: str = option("", "JSONL of prompts for the rollouts", required=True)
    eval_prompts: str = option("", "JSONL of held-out prompts for the report (default: --prompts)")
    gold: str = option("none", "a known true score to report beside the proxy: none | arithmetic")
    out: str = option("", "run directory to write", required=True)
    eval_every: int = option(
        10, "evaluate and save the policy every this many iterations", check=">=1"
    )
    eval_samples: int = option(128, "held-out prompts per evaluation", check=">=1")
    max_kl: float = option(
        0.0,
        "stop when the answers' mean KL from the reference exceeds this (0: no bound)",
        check=">=0",
    )


# The stages' name for the one check of declared options (`required=True`, `check=` ranges):
# core's, as the image options and `lm pretrain` use it, so a mistake reads alike on both halves.
check_declared = check_fields


def check_number(
    flag: str, value: float, low: float, high: float = float("inf"), *, low_open: bool = False
) -> None:
    """One line unless low <= value <= high (low < value with low_open), in the words of a
    declared range (`check_range`); NaN refused."""
    if high == float("inf"):
        rule = f">{low:g}" if low_open else f">={low:g}"
    else:
        rule = f"{'(' if low_open else '['}{low:g},{high:g}]"
    check_range(value, rule, flag)


def check_ranges(config: LMConfig) -> None:
    """The checks of a new run's options that need no file and no torch (one line each): --data
    given, every option in the range its field declares (`check=`), --devices well formed."""
    if not config.data:
        raise SelfsupError("--data is required: a .txt or .jsonl file, or a folder of them")
    check_fields(config)
    if not re.fullmatch(r"auto|-1|[1-9]\d*|\d+(,\d+)*,?", str(config.devices)):
        raise SelfsupError(
            f"--devices {config.devices!r}: expected a number of devices, -1, auto, or a comma "
            "list of device indices"
        )
