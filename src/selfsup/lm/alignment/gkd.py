"""On-policy distillation of a student LM from a teacher LM (GKD, Agarwal et al., 2024):
`selfsup lm distill`.

Each batch of conversations is answered either by the file (the conversations' own answers) or,
for a `--lmbda` share of the batches, by the student itself, sampled at `--temperature` from the
prompt (the conversation up to its last answer). On those answer tokens the student's
next-token distribution is pulled to the frozen teacher's by the generalized Jensen-Shannon
divergence with `--beta` (`selfsup.lm.losses.gkd`: 0 the forward KL, 1 the reverse KL), both at
`--temperature`. Teacher and student are runs or local Hugging Face folders with one tokenizer
(a student without chat markers gets them as `lm sft` gives them); the teacher is never saved.
The loop (epochs, validation: the JSD on the held-out conversations' own answers, checkpoints,
RUN/hf, --lora-r, --resume) is `posttrain.fit_stage`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.lm.alignment.online import load_policy
from selfsup.lm.alignment.ppo import disable_dropout
from selfsup.lm.alignment.rollout import forward_response, sample
from selfsup.lm.alignment.stage import EpochStage
from selfsup.lm.data.chat_data import IGNORE, collate, sft_example
from selfsup.lm.data.context import check_fits, fit_prompt, shortest_context
from selfsup.lm.data.conversations import Message, conversation_lines
from selfsup.lm.losses.gkd import generalized_jsd
from selfsup.lm.models import lora
from selfsup.lm.options import PromptFit, TuneConfig
from selfsup.lm.training import posttrain


@dataclass
class Options(TuneConfig, PromptFit):
    """Options of `selfsup lm distill`: TuneConfig's loop, the teacher and GKD's knobs."""

    init: str = option(
        "",
        "the student: a run directory or local HF folder (chat markers are added when it has "
        "none) (required unless --resume RUN)",
    )
    teacher: str = option(
        "",
        "the frozen teacher: a chat run (e.g. lm sft's) or local HF folder with the student's "
        "tokenizer (required unless --resume RUN)",
    )
    data: str = option(
        "",
        "JSONL conversations, as lm sft reads them: their prompts, and their answers for the "
        "batches the student does not answer itself (required unless --resume RUN)",
    )
    batch_size: int = option(
        16, "conversations per step (a sampled batch: one answer of the student each)", check=">=1"
    )
    pack: bool = option(False, "not used by distill", cli=False)
    beta: float = option(
        0.5,
        "β of the generalized Jensen-Shannon divergence: 0 the forward KL(teacher || student), "
        "1 the reverse KL(student || teacher) (TRL's GKD convention)",
        check="[0,1]",
    )
    lmbda: float = option(
        0.5,
        "share of the batches whose answers the student samples itself (on-policy); the others "
        "use the file's answers",
        check="[0,1]",
    )
    temperature: float = option(
        1.0,
        "temperature of the student's sampled answers and of both distributions in the loss",
        check=">0",
    )
    max_new_tokens: int = option(24, "longest answer the student samples, in tokens", check=">=1")


class GKD(EpochStage):
    Options = Options
    help = "distil a student LM from a teacher LM on-policy (GKD: generalized JSD)"
    description = (
        "on-policy distillation (GKD, Agarwal et al., 2024): the student learns the frozen "
        "teacher's next-token distributions (generalized Jensen-Shannon divergence, --beta) on "
        "the file's answers and, for a --lmbda share of the batches, on answers it samples "
        "itself. Teacher and student must share a tokenizer. Writes a run directory (training "
        "counted in --epochs; val loss: the JSD on held-out answers)."
    )
    entry = "distill"


def load_pair(student: str, teacher: str) -> tuple[Any, Any, Any]:
    """(tokenizer, student, teacher in eval mode): refused in one line when the two tokenizers'
    vocabularies differ (the loss compares distributions token by token)."""
    from transformers import AutoModelForCausalLM

    teacher_tokenizer, teacher_model = load_policy(teacher)
    tokenizer, student_model = lora.load_tokenizer_and(student, AutoModelForCausalLM)
    posttrain.prepare_chat(student_model, tokenizer)  # the markers lm sft gives, in its order
    ours, theirs = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if ours != theirs:
        other = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[0]
        raise SelfsupError(
            f"the student {student} and the teacher {teacher} have different tokenizers "
            f"({len(ours)} and {len(theirs)} tokens; first difference: {other[0]!r} id "
            f"{other[1]}): distillation needs a student with the teacher's tokenizer"
        )
    return tokenizer, student_model, teacher_model.requires_grad_(False)


def prompt_of(conversation: list[Message]) -> list[Message]:
    """The conversation up to its last answer (what the student answers on-policy)."""
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    return conversation[:last]


def distill_examples(config: Options, tokenizer: Any, context: int | None) -> list[tuple]:
    """((ids, labels), prompt) of every conversation of --data: its rows checked against the
    shorter context, its prompt fitted to leave --max-new-tokens when the student samples."""
    examples = []
    for where, conversation in conversation_lines(config.data):
        row = sft_example(tokenizer, conversation, config.max_length)
        hint = posttrain.cut_hint(config, context)
        check_fits(len(row[0]), context, where, "the conversation", hint)
        prompt = prompt_of(conversation)
        if config.lmbda > 0:
            new = config.max_new_tokens
            prompt = fit_prompt(tokenizer, prompt, context, new, where, config.truncate)
        examples.append((row, prompt))
    return examples


class DistillLoss:
    """The stage's loss of a batch: the generalized JSD of the student's next-token
    distributions to the frozen teacher's on the batch's answers, the student's own sampled
    ones for a --lmbda share of training batches (validation: the file's answers)."""

    def __init__(self, config: Options, tokenizer: Any, teacher: Any) -> None:
        self.config, self.tokenizer, self.teacher = config, tokenizer, teacher

    def __call__(self, m: Any, batch: list) -> tuple[Tensor, dict[str, float]]:
        c = self.config
        ours, theirs, mask = self.logits(m, batch)
        width = min(ours.shape[-1], theirs.shape[-1])  # embeddings padded past the tokenizer
        jsd = generalized_jsd(ours[..., :width], theirs[..., :width], mask, c.beta, c.temperature)
        return jsd, {}

    def logits(self, m: Any, batch: list) -> tuple[Tensor, Tensor, Tensor]:
        """(student logits, teacher logits, answer mask) at the positions predicting answers."""
        c, device = self.config, posttrain.device_of(m)
        teacher = self.teacher.to(device)
        if m.training and c.lmbda > 0 and float(torch.rand(())) < c.lmbda:
            m.eval()  # the torch RNG is in the checkpoint: a resumed run draws the same
            prompts = [p for _, p in batch]
            r = sample(m, self.tokenizer, prompts, c.max_new_tokens, c.temperature)
            m.train()
            r = dataclasses.replace(r, temperature=1.0)  # the loss applies the temperature
            with torch.no_grad():
                theirs, _, _ = forward_response(teacher, r)
            ours, _, _ = forward_response(m, r)
            return ours, theirs, r.response_mask.bool()
        rows = collate([row for row, _ in batch], self.tokenizer.pad_token_id)
        b = {k: v.to(device) for k, v in rows.items()}
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        with torch.no_grad():
            theirs = teacher(**inputs).logits[:, :-1]
        return m(**inputs).logits[:, :-1], theirs, b["labels"][:, 1:] != IGNORE


def distill(config: Options, command: str | None = None) -> Path:
    """GKD of the student --init from --teacher on --data; returns the run directory."""
    config = posttrain.checked_config(config)
    if not config.teacher:
        raise SelfsupError("--teacher is required")
    torch.manual_seed(config.seed)  # new embedding rows, dropout, the on-policy draws
    tokenizer, student, teacher = load_pair(config.init, config.teacher)
    examples = distill_examples(config, tokenizer, shortest_context(student, teacher))
    train, val = posttrain.split_validation(examples, config.val_fraction, "conversations")
    disable_dropout(student)  # as TRL's GKD: the student's samples and scores agree
    loss = DistillLoss(config, tokenizer, teacher)
    return posttrain.fit_stage("distill", config, command, student, tokenizer, train, val, loss)
