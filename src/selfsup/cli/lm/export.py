"""`selfsup lm export`: the model of a stage's run as a folder of its own; see
selfsup.cli.lm.main."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from selfsup.cli.lm.common import add_command


def _add_export(sub, parents: list[argparse.ArgumentParser]) -> None:
    """write a run's model to a folder (--merge: a LoRA adapter merged into its base)

    Write the model of a stage's run (sft, reward, dpo, simpo, kto, grpo, rlhf) to --out: with
    --merge a whole Hugging Face model and its tokenizer, a LoRA adapter merged into its base
    (AutoModelForCausalLM.from_pretrained(OUT) loads it); without, RUN/hf as it is (the adapter
    of a LoRA run: adapter_model.safetensors, adapter_config.json, the tokenizer)."""
    e = add_command(sub, parents, "export", _add_export, _run_export)
    e.add_argument("run", help="run directory of a stage (or its hf/ folder)")
    e.add_argument("--out", required=True, help="the folder to write (new or empty)")
    e.add_argument(
        "--merge", action="store_true", help="merge a LoRA adapter into its base (a whole model)"
    )


def _run_export(args: argparse.Namespace, command: str) -> None:
    from selfsup.lm.models.lora import export

    out = export(args.run, args.out, args.merge)
    print(f"{'merged model' if args.merge else 'model'} written to {out}/")


EXPORT_COMMANDS: list[Callable] = [_add_export]
