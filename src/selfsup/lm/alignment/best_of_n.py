"""Best-of-n (`selfsup lm best-of-n`): the training-free baseline, the reward model's favourite
of n samples, measured for several n (`rlhf.best_of_n`); with --out the table is kept in a
folder with its report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfsup.core import run as rundir
from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.lm.alignment.stage import Stage
from selfsup.lm.options import PromptFit, check_declared


@dataclass
class Options(PromptFit):
    """Options of `selfsup lm best-of-n`."""

    policy: str = option("", "the SFT run to sample from", required=True)
    reward: str = option("", "the reward-model run", required=True)
    prompts: str = option("", "JSONL of held-out prompts", required=True)
    n: str = option("1,2,4,8,16,32,64", "comma list of n")
    gold: str = option("none", "none | arithmetic")
    limit: int = option(128, "prompts used", check=">=1")
    pool: int = option(0, "answers sampled per prompt (0: the largest n)", check=">=0")
    max_new_tokens: int = option(24, "longest answer in tokens", check=">=1")
    no_end_score: float = option(
        -1.0,
        "the score of an answer that never emits the end token (as lm rlhf)",
        check="finite",
    )
    seed: int = option(0, "random seed")
    out: str | None = option(
        None, "a folder to keep the table in (best_of_n.json, config.yaml) with its report.html"
    )


def best_of_n(options: Options, command: str | None = None) -> Path | None:
    """Print the best-of-n table; with --out keep it there (returned), else return None."""
    from selfsup.lm.alignment.rlhf import best_of_n as measure

    try:
        ns = sorted({int(n) for n in options.n.split(",") if n.strip()})
    except ValueError:
        raise SelfsupError(f"--n {options.n!r}: expected a comma list of integers") from None
    if not ns or ns[0] < 1:
        raise SelfsupError(f"--n {options.n!r}: every n must be at least 1")
    check_declared(options)
    if options.out and Path(options.out).is_file():  # told before any sampling
        raise SelfsupError(f"--out {options.out} is a file; expected a folder")
    o = options
    rows = measure(
        o.policy, o.reward, o.prompts, ns, o.gold, o.max_new_tokens, o.limit, o.seed, o.pool,
        o.no_end_score, o.truncate,
    )  # fmt: skip
    print(f"{'n':>4} {'KL bound':>9} {'proxy':>7}" + (f" {'gold':>6}" if "gold" in rows[0] else ""))
    for r in rows:
        gold = f" {r['gold']:6.3f}" if "gold" in r else ""
        print(f"{r['n']:4d} {r['kl_bound']:9.3f} {r['proxy']:7.3f}{gold}")
    if not options.out:
        return None
    return keep_table(Path(options.out), rows, options, command or "")


def keep_table(out: Path, rows: list[dict], options: Any, command: str) -> Path:
    """OUT/best_of_n.json, config.yaml (the options) and command.txt, under the run lock."""
    import yaml

    kept = {k: v for k, v in vars(options).items() if k != "out"}
    config = {"stage": "best-of-n", **{k: v for k, v in kept.items() if _scalar(v)}}
    with rundir.run_locked(out):  # one writer per run folder
        out.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write_text(out / "best_of_n.json", json.dumps(rows, indent=2) + "\n")
        rundir.atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        rundir.write_command(out, command, append=False)
    return out


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool))


class BestOfN(Stage):
    Options = Options
    help = "the training-free baseline: the reward model's favourite of n samples"
    options_file = "flags"  # --config gives flags (cli.option_files); it records no run to repeat
    entry = "best_of_n"

    @staticmethod
    def summary(run: Path) -> tuple[list[str], list[str]]:
        return [f"table: {run / 'best_of_n.json'}"], []
