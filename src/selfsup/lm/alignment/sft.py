"""Supervised fine-tuning (`selfsup lm sft`): conversations, loss on the assistant's tokens
only, in posttrain's loop (`fit_stage`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from selfsup.core.errors import SelfsupError
from selfsup.lm.alignment.stage import EpochStage
from selfsup.lm.data.chat_data import collate, next_token_loss, pack, sft_example
from selfsup.lm.data.context import check_fits, context_length
from selfsup.lm.data.conversations import conversation_lines
from selfsup.lm.models import lora
from selfsup.lm.options import TuneConfig as Options
from selfsup.lm.training import posttrain


def sft(config: Options, command: str | None = None) -> Path:
    """Supervised fine-tuning; returns the run directory."""
    from transformers import AutoModelForCausalLM

    config = posttrain.checked_config(config)
    torch.manual_seed(config.seed)  # new embedding rows and dropout masks
    conversations = conversation_lines(config.data)
    tokenizer, model = lora.load_tokenizer_and(config.init, AutoModelForCausalLM)
    posttrain.prepare_chat(model, tokenizer)
    context = context_length(model)
    if config.pack and context is not None and config.max_length > context:
        raise SelfsupError(
            f"--pack --max-length {config.max_length}: blocks longer than the model's context "
            f"of {context} tokens; pass --max-length {context} or less"
        )
    examples = []
    for where, conversation in conversations:
        example = sft_example(tokenizer, conversation, config.max_length)
        check_fits(
            len(example[0]), context, where, "the conversation", posttrain.cut_hint(config, context)
        )
        examples.append(example)
    train, val = posttrain.split_validation(examples, config.val_fraction, "conversations")
    if config.pack:
        train = pack(train, config.max_length)

    def loss_fn(m: Any, batch: list) -> tuple[torch.Tensor, dict[str, float]]:
        b = {
            k: v.to(posttrain.device_of(m))
            for k, v in collate(batch, tokenizer.pad_token_id).items()
        }
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return next_token_loss(logits, b["labels"]), {}

    loss = posttrain.TokenMean(loss_fn)  # several processes weigh their shares by tokens
    return posttrain.fit_stage("sft", config, command, model, tokenizer, train, val, loss)


class SFT(EpochStage):
    Options = Options
    help = "supervised fine-tuning on conversations (assistant tokens)"
    description = (
        "supervised fine-tuning on conversations (assistant tokens); writes a run directory "
        "(training counted in --epochs)."
    )
    entry = "sft"
    after = "selfsup lm chat {run}  (or: selfsup lm label {run} --prompts P.jsonl -o R.jsonl)"
