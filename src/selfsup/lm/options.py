"""The options of every `selfsup lm` training command, without torch.

The command line builds its parsers from these dataclasses, so `selfsup lm ... --help` and
usage errors stay instant; the modules that train import them from here
(`selfsup.lm.models.gpt.Options` is `GPTOptions`, `selfsup.lm.training.pretrain.LMConfig` is
`LMConfig`, ...). Only the standard library and `selfsup.core.config` may be imported here
(tests/test_lm_cli.py checks that torch is not).

Vocabulary shared with the image side: `--data` (the input file or folder), `--out` (the run
directory), `--resume RUN`, `--seed`, `--accelerator`, `--devices`, `--precision`,
`--progress/--no-progress`. Language models count training in `--steps` (sft and reward in
`--epochs`, rlhf in `--iterations`); image runs count `--epochs`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError

PROGRESS_HELP = "progress bars (default: on a terminal; otherwise one line per validation)"
DEVICES_HELP = "number of devices or 'auto' (every GPU, one process each; one on a CPU)"
ONE_DEVICE_HELP = "1 or auto: this stage trains in one process, on one device"
PRECISION_HELP = "Lightning precision, e.g. bf16-mixed on a GPU"
TRUNCATE_HELP = (
    "cut a prompt that leaves no room for --max-new-tokens in the model's context from the left "
    "(oldest turns first, then the start of its text), as TRL's max_prompt_length; without it "
    "such a prompt stops the command with one line naming its line in the file"
)
MAX_LENGTH_HELP = (
    "tokens per conversation: longer ones are cut{}; a conversation beyond the model's "
    "context stops the command with one line naming its line (pass --max-length CONTEXT to cut "
    "there)"
)


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
    steps: int = option(2000, "optimisation steps (language models count steps, not epochs)")
    batch_size: int = option(12, "sequences per batch")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    min_lr_fraction: float = option(0.1, "the cosine decays to this fraction of --lr")
    warmup_steps: int = option(100, "linear warm-up steps before the cosine decay")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)")
    beta2: float = option(0.99, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)")
    eval_interval: int = option(250, "validate every N steps")
    eval_batches: int = option(20, "batches per periodic validation")
    final_eval_batches: int = option(200, "batches of the final validation estimate")
    init: str | None = option(None, "start from this local Hugging Face checkpoint folder")
    threads: int = option(
        0,
        "CPU threads of a CPU run (0: auto: 1 for a model under 5M parameters, whose small "
        "matrices lose more to thread hand-offs than they gain, else torch's count less the "
        "cores other processes keep busy)",
    )
    seed: int = option(0, "random seed (initialisation, batches)")
    accelerator: str = option("auto", "cpu | gpu | auto (Lightning)")
    devices: str = option("auto", DEVICES_HELP)
    precision: str | None = option(
        None, "Lightning precision (default: bf16-mixed on GPU, else 32)"
    )
    progress: bool | None = option(None, PROGRESS_HELP)
    out: str | None = option(None, "run directory (default runs/lm-KIND-CORPUS-TIMESTAMP)")
    resume: str | None = option(None, "continue the run in this directory from its last checkpoint")


@dataclass
class GPTOptions:
    """GPT options of `selfsup lm pretrain gpt` (defaults: nanoGPT's CPU "baby GPT")."""

    block_size: int = option(64, "context length in tokens")
    n_layer: int = option(4, "transformer blocks")
    n_head: int = option(4, "attention heads")
    n_embd: int = option(128, "width of the residual stream")
    dropout: float = option(0.0, "dropout probability")
    activation: str = option("gelu", "MLP activation: gelu (exact) | gelu_new (GPT-2's tanh form)")


@dataclass
class BertOptions:
    """BERT options of `selfsup lm pretrain bert` (a small BERT; base is 768 × 12 × 12)."""

    hidden_size: int = option(128, "width of the transformer")
    num_layers: int = option(2, "transformer layers")
    num_heads: int = option(2, "attention heads")
    intermediate_size: int = option(512, "width of the feed-forward layers")
    max_length: int = option(64, "longest pair in tokens, [CLS] and [SEP]s included")
    dropout: float = option(0.1, "dropout probability")
    mask_prob: float = option(0.15, "fraction of the tokens chosen for prediction")


BERT_DEFAULTS: dict[str, Any] = {
    "tokenizer": "bpe",
    "vocab_size": 4096,
    "batch_size": 32,
    "lr": 5e-4,
    "weight_decay": 0.01,
    "steps": 2000,
}


@dataclass
class Word2VecConfig:
    """`selfsup lm pretrain word2vec`: gensim's names and defaults where it has the option."""

    data: str | None = option(None, "the corpus: a .txt or .jsonl file, or a folder of them")
    encoding: str = option("utf-8", "text encoding of the corpus files")
    text_field: str = option("text", "field of the text in .jsonl records")
    dim: int = option(100, "size of the word vectors (gensim: vector_size)")
    window: int = option(5, "largest distance between a word and its context")
    negatives: int = option(5, "noise words per (word, context) pair (gensim: negative)")
    min_count: int = option(5, "ignore words seen fewer times")
    sample: float = option(1e-3, "subsampling threshold for frequent words (0: keep all)")
    epochs: int = option(5, "passes over the corpus (word2vec counts epochs)")
    optimizer: str = option(
        "sgd", "sgd (word2vec's, per-pair rate) | adam (steadier on small vocabularies)"
    )
    lr: float = option(
        0.025, "learning rate, decayed linearly to 0 (gensim: alpha; adam: try 0.03)"
    )
    batch_words: int = option(2000, "consecutive words per step (windows stay inside)")
    seed: int = option(0, "random seed (initialisation, subsampling, windows, negatives)")
    accelerator: str = option("cpu", "cpu | gpu | auto (Lightning)")
    devices: str = option("1", ONE_DEVICE_HELP)
    precision: str = option("32-true", PRECISION_HELP)
    progress: bool | None = option(None, "progress bar (default: on a terminal)")
    out: str | None = option(None, "run directory (default runs/lm-word2vec-CORPUS-TIMESTAMP)")


@dataclass
class TuneConfig:
    """Options shared by `selfsup lm sft` and `selfsup lm reward` (same names in Python)."""

    init: str = option(
        "",
        "the model to start from: a run directory or a local HF folder (required unless "
        "--resume RUN)",
    )
    data: str = option(
        "", "JSONL: conversations (sft) or rankings (reward) (required unless --resume RUN)"
    )
    out: str = option("", "run directory to write (not needed with --resume RUN)")
    epochs: int = option(3, "passes over the training data (sft and reward count epochs)")
    batch_size: int = option(16, "conversations (sft) or ranked prompts (reward) per step")
    lr: float = option(1e-4, "peak learning rate (AdamW, warm-up then cosine)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(10, "linear warm-up steps")
    max_length: int = option(256, MAX_LENGTH_HELP.format(" (sft: their end; reward: their start)"))
    pack: bool = option(False, "sft: pack conversations into blocks of --max-length tokens")
    val_fraction: float = option(0.1, "the last fraction of the file validates")
    seed: int = option(0, "random seed (order of the examples)")
    accelerator: str = option("auto", "cpu | gpu | auto")
    devices: str = option("1", ONE_DEVICE_HELP)
    precision: str = option("32-true", PRECISION_HELP)
    progress: bool | None = option(None, "progress bars (default: on a terminal)")
    resume: str | None = option(
        None, "continue the run in this directory from its last epoch (True: the one in --out)"
    )


@dataclass
class PPOSettings:
    """The knobs of PPO for language models (defaults after InstructGPT / TRL's PPO)."""

    rollouts: int = option(16, "answers sampled per iteration")
    minibatch: int = option(8, "answers per PPO update")
    ppo_epochs: int = option(4, "passes of PPO updates over each batch of answers")
    lr: float = option(1e-5, "learning rate of policy and value head (AdamW)")
    beta: float = option(0.05, "KL penalty per token, beta * (log pi - log pi_ref)")
    clip: float = option(0.2, "clip range of the policy ratio")
    value_clip: float = option(0.2, "clip range of the value update")
    value_coef: float = option(0.1, "weight of the value loss")
    gamma: float = option(1.0, "discount of GAE")
    lam: float = option(0.95, "lambda of GAE")
    max_new_tokens: int = option(24, "longest answer in tokens")
    temperature: float = option(
        1.0, "sampling temperature of the rollouts (their log-probabilities use it too)"
    )
    no_end_score: float = option(-1.0, "the score of an answer that never emits the end token")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    adaptive_kl: float = option(
        0.0,
        "adapt beta to hold the rollouts' KL from the reference near this many nats per answer "
        "(Ziegler et al. 2019; 0: a fixed --beta)",
    )
    kl_horizon: int = option(10000, "adaptive KL: the horizon (in answers) of beta's adaptation")
    target_kl: float = option(
        0.0,
        "end an iteration's PPO epochs early once a minibatch's approximate KL from the "
        "rollouts' policy exceeds this (0: never)",
    )


@dataclass
class RLHFConfig(PPOSettings):
    """Options of `selfsup lm rlhf` (PPO's knobs plus the run's inputs)."""

    policy: str = option(
        "", "the SFT run (or local HF folder) to start from; also the reference", required=True
    )
    reward: str = option("", "the reward-model run (or local HF folder)", required=True)
    prompts: str = option("", "JSONL of prompts for the rollouts", required=True)
    eval_prompts: str = option("", "JSONL of held-out prompts for the report (default: --prompts)")
    gold: str = option("none", "a known true score to report beside the proxy: none | arithmetic")
    out: str = option("", "run directory to write", required=True)
    iterations: int = option(
        50, "PPO iterations (sample, score, update); RLHF counts iterations, not steps"
    )
    eval_every: int = option(10, "evaluate and save the policy every this many iterations")
    eval_samples: int = option(128, "held-out prompts per evaluation")
    max_kl: float = option(
        0.0, "stop when the rollouts' mean KL from the reference exceeds this (0: no bound)"
    )
    truncate: bool = option(False, TRUNCATE_HELP)
    seed: int = option(0, "random seed")
    accelerator: str = option("auto", "cpu | gpu | auto")
    devices: str = option("1", ONE_DEVICE_HELP)
    precision: str = option("32-true", PRECISION_HELP)
    progress: bool | None = option(None, "progress bar (default: on a terminal)")


@dataclass(frozen=True)
class Kind:
    """A model kind of `selfsup lm pretrain KIND` as the command line sees it."""

    help: str
    configs: tuple[type, ...]  # the dataclasses mirrored as flags, in order
    defaults: dict[str, Any]  # the kind's own defaults of LMConfig's options
    presets: dict[str, dict[str, Any]]  # --preset NAME: named settings (flags override them)


_BABY: dict[str, Any] = dict(
    tokenizer="char", steps=2000, batch_size=12, lr=1e-3, min_lr_fraction=0.1, warmup_steps=100,
    weight_decay=0.1, beta2=0.99, grad_clip=1.0, eval_interval=250, eval_batches=20,
    final_eval_batches=200, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
)  # fmt: skip

# benchmarks/gpt_shakespeare.py's recipes (README: "Language"), by name.
GPT_PRESETS: dict[str, dict[str, Any]] = {
    "baby": _BABY,  # nanoGPT's CPU baby GPT: val loss about 1.90 on tinyshakespeare
    "baby-fast": {**_BABY, "steps": 1200, "lr": 4e-3},  # about 1.87 in 90 s on 2 CPU cores
    "long": {
        **_BABY,
        "steps": 2500,
        "batch_size": 32,
        "lr": 1.5e-3,
        "block_size": 128,
        "eval_interval": 500,
    },  # fmt: skip
}

KINDS: dict[str, Kind] = {
    "gpt": Kind(
        "GPT: a causal transformer trained to predict the next token (the pretraining of LLMs).",
        (LMConfig, GPTOptions),
        {},
        GPT_PRESETS,
    ),
    "bert": Kind(
        "BERT: masked-language modelling plus next-sentence prediction (Devlin et al., 2019).",
        (LMConfig, BertOptions),
        BERT_DEFAULTS,
        {},
    ),
    "word2vec": Kind(
        "word2vec: skip-gram with negative sampling (Mikolov et al., 2013).",
        (Word2VecConfig,),
        {},
        {},
    ),
}


def check_number(
    flag: str, value: float, low: float, high: float = float("inf"), *, low_open: bool = False
) -> None:
    """One line unless low <= value <= high (low < value with low_open), NaN refused."""
    ok = value == value and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        if high != float("inf"):
            bound += f" and <= {high:g}"
        raise SelfsupError(f"{flag} must be {bound}, got {value}")


def check_ranges(config: LMConfig) -> None:
    """The checks of a new run's options that need no file and no torch (one line each)."""
    if not config.data:
        raise SelfsupError("--data is required: a .txt or .jsonl file, or a folder of them")
    positive = [
        ("--steps", config.steps),
        ("--batch-size", config.batch_size),
        ("--eval-interval", config.eval_interval),
        ("--eval-batches", config.eval_batches),
        ("--final-eval-batches", config.final_eval_batches),
    ]
    if config.threads < 0:
        raise SelfsupError(f"--threads must be at least 0 (0: auto), got {config.threads}")
    for flag, value in positive:
        if value < 1:
            raise SelfsupError(f"{flag} must be at least 1, got {value}")
    check_number("--lr", config.lr, 0, low_open=True)
    check_number("--weight-decay", config.weight_decay, 0)
    check_number("--warmup-steps", config.warmup_steps, 0)
    check_number("--grad-clip", config.grad_clip, 0)
    check_number("--min-lr-fraction", config.min_lr_fraction, 0, 1)
    if not 0 <= config.beta2 < 1:
        raise SelfsupError(f"--beta2 must be in [0, 1), got {config.beta2}")
    if not re.fullmatch(r"auto|-1|[1-9]\d*|\d+(,\d+)*,?", str(config.devices)):
        raise SelfsupError(
            f"--devices {config.devices!r}: expected a number of devices, -1, auto, or a comma "
            "list of device indices"
        )


@dataclass
class DPOConfig(TuneConfig):
    """Options of `selfsup lm dpo`: TuneConfig's loop, its own defaults, and β."""

    init: str = option(
        "",
        "the SFT run (or local HF folder) to start from; also the frozen reference (required "
        "unless --resume RUN)",
    )
    data: str = option(
        "",
        "JSONL rankings ('D > C > A = B': every strictly ordered pair) or TRL's chosen/rejected "
        "records, text or conversational (required unless --resume RUN)",
    )
    epochs: int = option(1, "passes over the pairs")
    batch_size: int = option(16, "preference pairs per step")
    lr: float = option(1e-5, "peak learning rate (AdamW, warm-up then cosine)")
    max_length: int = option(128, MAX_LENGTH_HELP.format(" (they lose their start)"))
    beta: float = option(
        0.1, "the KL strength: implicit reward β·(log π - log π_ref); smaller β strays further"
    )


@dataclass
class GRPOConfig:
    """Options of `selfsup lm grpo` (defaults after DeepSeekMath's GRPO, scaled down)."""

    policy: str = option(
        "", "the SFT run (or local HF folder) to start from; also the reference", required=True
    )
    reward: str = option("", "the reward-model run (or local HF folder)", required=True)
    prompts: str = option("", "JSONL of prompts for the rollouts", required=True)
    eval_prompts: str = option("", "JSONL of held-out prompts for the report (default: --prompts)")
    gold: str = option("none", "a known true score to report beside the proxy: none | arithmetic")
    reward_from: str = option(
        "model",
        "what the answers are scored by: model (the reward model) | gold (the known gold score "
        "itself: for analysis only, needs --gold)",
    )
    out: str = option("", "run directory to write", required=True)
    iterations: int = option(50, "iterations (sample groups, score, update)")
    prompts_per_iteration: int = option(4, "prompts per iteration, each answered G times")
    group_size: int = option(8, "answers per prompt (G); advantages are standardised within them")
    minibatch: int = option(16, "answers per gradient step")
    grpo_epochs: int = option(1, "passes over each iteration's answers (μ)")
    lr: float = option(1e-5, "learning rate (AdamW)")
    beta: float = option(0.04, "weight of the k3 KL estimate to the reference in the loss")
    clip: float = option(0.2, "clip range of the policy ratio")
    max_new_tokens: int = option(24, "longest answer in tokens")
    temperature: float = option(1.0, "sampling temperature of the answers")
    no_end_score: float = option(-1.0, "the score of an answer that never emits the end token")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    eval_every: int = option(10, "evaluate and save the policy every this many iterations")
    eval_samples: int = option(128, "held-out prompts per evaluation")
    max_kl: float = option(
        0.0, "stop when the answers' mean KL from the reference exceeds this (0: no bound)"
    )
    truncate: bool = option(False, TRUNCATE_HELP)
    seed: int = option(0, "random seed")
    accelerator: str = option("auto", "cpu | gpu | auto")
    devices: str = option("1", ONE_DEVICE_HELP)
    precision: str = option("32-true", PRECISION_HELP)
    progress: bool | None = option(None, "progress bar (default: on a terminal)")
