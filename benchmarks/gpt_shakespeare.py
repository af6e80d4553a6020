"""selfsup's GPT on tinyshakespeare with nanoGPT's CPU "baby GPT" configuration.

nanoGPT's command (README, "I only have a macbook"):
    python train.py config/train_shakespeare_char.py --device=cpu --compile=False
    --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
    --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
with that config's lr 1e-3 (cosine to 1e-4), 100 warm-up steps, AdamW beta2 0.99, weight
decay 0.1, gradient clipping 1.0, validation every 250 steps. The same settings here, then the
validation loss averaged over 200 batches (nanoGPT reports a 20-batch estimate).

    python benchmarks/gpt_shakespeare.py                  # the reference configuration
    python benchmarks/gpt_shakespeare.py --recipe baby-fast  # same model, lr 4e-3, 1,200 steps
    python benchmarks/gpt_shakespeare.py --recipe long    # the longer recipe
    python benchmarks/gpt_shakespeare.py --devices 2      # 2 data-parallel processes, 1 thread each

The recipes are the presets of `selfsup lm pretrain gpt --preset NAME` (GPTModule.presets).

Prints wall time (everything: reading, tokenizing, training, evaluating, exporting),
training iterations per second and the validation loss; results in RUN/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from selfsup.lm.models.gpt import GPTModule, Options
from selfsup.lm.training.pretrain import pretrain_lm

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "tinyshakespeare.txt"
OPTION_NAMES = {f.name for f in dataclasses.fields(Options)}
PRESETS = GPTModule.presets  # each over the defaults of LMConfig and Options


def recipe(name: str) -> tuple[dict, Options]:
    """The preset `selfsup lm pretrain gpt --preset NAME` as (run settings, model options)."""
    preset = PRESETS[name]
    options = Options(**{k: v for k, v in preset.items() if k in OPTION_NAMES})
    return {k: v for k, v in preset.items() if k not in OPTION_NAMES}, options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", choices=sorted(PRESETS), default="baby")
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--steps", type=int, help="override the recipe's steps")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batches")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--devices", type=int, default=1, help="data-parallel CPU processes (each gets a share)"
    )
    parser.add_argument("--out", help="run directory (default: a temporary one)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings, options = recipe(args.recipe)
    settings |= {"steps": args.steps} if args.steps else {}
    out = args.out or str(Path(tempfile.mkdtemp(prefix="gpt-shakespeare-")) / "run")
    began = time.perf_counter()
    run = pretrain_lm(
        model="gpt",
        data=args.corpus,
        progress=False,
        accelerator="cpu",
        devices=str(args.devices),
        out=out,
        seed=args.seed,
        options=options,
        **settings,
    )
    wall = time.perf_counter() - began
    results = json.loads((run / "results.json").read_text())
    print(f"recipe {args.recipe}, seed {args.seed}: {settings} {options}")
    print(
        f"torch {torch.__version__}, {args.devices} process(es), {torch.get_num_threads()} threads"
    )
    print(
        f"wall time:      {wall:.1f} s (training with periodic validation: "
        f"{results['train_seconds']} s)"
    )
    print(f"iterations/s:   {results['steps_per_second']:.2f}")
    print(
        f"val loss:       {results['val_loss']:.4f} ({results['eval_batches']} batches, "
        f"{results['kept']} weights)"
    )
    print(f"run directory:  {run}")


if __name__ == "__main__":
    main()
