"""Edge cases of the language side's inputs: generated files and strings either load or end in
one SelfsupError line (property-based, with hypothesis), and checks of runs' inputs and options."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfsup.core.errors import SelfsupError
from selfsup.lm.data.conversations import read_conversations, read_prompts, read_rankings
from selfsup.lm.data.corpus import read_texts
from selfsup.lm.losses.preference import LETTERS, parse_ranking

FEW = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
LOADERS = (read_conversations, read_prompts, read_rankings)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
# records that look like the real formats, so that the checks past "is it an object" run too
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "bot"]),
            "content": st.text(max_size=6),
        }
    ),
    max_size=4,
)
rankings = st.text(alphabet="ABCDEZ>= ", max_size=12)
records = st.one_of(
    st.fixed_dictionaries({"messages": messages}),
    st.fixed_dictionaries({"prompt": st.text(max_size=6), "completion": st.text(max_size=6)}),
    st.fixed_dictionaries(
        {
            "prompt": st.text(max_size=6),
            "completions": st.lists(st.text(max_size=4), max_size=4),
            "ranking": rankings,
        },
        optional={"gold": st.lists(st.floats() | st.integers() | st.booleans(), max_size=4)},
    ),
    st.fixed_dictionaries(
        {"prompt": st.text(max_size=6), "chosen": json_values, "rejected": json_values}
    ),
    st.dictionaries(st.sampled_from(["prompt", "messages", "completions", "ranking"]), json_values),
)


def _loads_or_one_line(load, path: Path) -> None:
    try:
        loaded = load(path)
    except SelfsupError as e:
        assert "\n" not in str(e) and str(e), repr(str(e))
        return
    assert loaded
    for item in loaded if load is read_rankings else ():  # what loads is usable
        assert item.gold is None or all(math.isfinite(g) for g in item.gold)
        assert sorted(i for tier in item.tiers for i in tier) == list(range(len(item.completions)))


@FEW
@given(data=st.binary(max_size=200))
def test_any_bytes_load_or_give_one_line(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    for load in LOADERS:
        _loads_or_one_line(load, path)
    for name in ("f.jsonl", "f.txt"):
        (tmp_path / name).write_bytes(data)
        _loads_or_one_line(read_texts, tmp_path / name)


@FEW
@given(lines=st.lists(records | json_values, min_size=1, max_size=4))
def test_generated_jsonl_loads_or_gives_one_line(tmp_path: Path, lines: list) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    for load in LOADERS:
        _loads_or_one_line(load, path)
    _loads_or_one_line(read_texts, path)


@FEW
@given(
    ranking=st.text(alphabet=string.ascii_uppercase[:6] + "><= ,\n", max_size=14),
    k=st.integers(0, 27),
)
def test_ranking_strings_parse_to_a_partition_or_one_line(ranking: str, k: int) -> None:
    try:
        tiers = parse_ranking(ranking, k)
    except SelfsupError as e:
        assert "\n" not in str(e)
        return
    # independent check: the letters of the string, in order, are each completion once
    letters = [c for c in ranking if c in LETTERS]
    assert sorted(letters) == sorted(LETTERS[:k])
    assert [LETTERS[i] for tier in tiers for i in tier] == letters
    assert len(tiers) == ranking.count(">") + 1


@st.composite
def ranked_records(draw) -> tuple[dict, bool]:
    """A well-formed rankings record (k completions, a ranking of all of them, maybe gold
    scores, maybe not finite) and whether it should load."""
    k = draw(st.integers(2, 6))
    order = draw(st.permutations(list(LETTERS[:k])))
    joins = draw(
        st.lists(st.sampled_from([" > ", " = ", ">", "="]), min_size=k - 1, max_size=k - 1)
    )
    ranking = order[0] + "".join(j + c for j, c in zip(joins, order[1:], strict=True))
    record = {"prompt": draw(st.text(min_size=1).filter(str.strip)),
              "completions": draw(st.lists(st.text(max_size=5), min_size=k, max_size=k)),
              "ranking": ranking}  # fmt: skip
    gold = draw(st.none() | st.lists(st.floats() | st.integers(), min_size=k, max_size=k))
    if gold is not None:
        record["gold"] = gold
    return record, gold is None or all(math.isfinite(g) for g in gold)


@FEW
@given(item=ranked_records())
def test_well_formed_rankings_load_unless_a_gold_score_is_not_finite(tmp_path, item) -> None:
    record, loads = item
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(record) + "\n")  # json writes NaN and Infinity as such
    if loads:
        (ranking,) = read_rankings(path)
        letters = [c for c in record["ranking"] if c in LETTERS]
        assert [LETTERS[i] for tier in ranking.tiers for i in tier] == letters
    else:
        with pytest.raises(SelfsupError, match="must be a finite number"):
            read_rankings(path)


def test_binary_conversations_file_is_one_line_naming_it(tmp_path: Path, capsys) -> None:
    from selfsup.cli.main import main

    path = tmp_path / "conv.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n\x89PNG\r\n\x1a\n\x00\xff')
    for load in LOADERS:
        with pytest.raises(SelfsupError, match=r"conv.jsonl:2: not UTF-8 text \(byte 0x89\)"):
            load(path)
    assert main(["lm", "sft", "--init", str(tmp_path), "--data", str(path), "--out",
                 str(tmp_path / "run")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "conv.jsonl:2: not UTF-8" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("gold", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_gold_is_refused(tmp_path: Path, gold: str) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(
        f'{{"prompt": "p", "completions": ["a", "b"], "ranking": "A > B", "gold": [1, {gold}]}}\n'
    )
    with pytest.raises(SelfsupError, match=r"r.jsonl:1: 'gold' holds .*finite number"):
        read_rankings(path)


# --- runs: bad checkpoints, failed starts, options ------------------------------------------

TINY_GPT = ["--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
            "--batch-size", "8", "--eval-batches", "2", "--final-eval-batches", "2",
            "--tokenizer", "char", "--no-progress"]  # fmt: skip


def _one_line_error(args: list[str], capsys) -> str:
    from selfsup.cli.main import main

    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    # (progress bars of a model load may come first, on their own \r-ended line)
    assert "Traceback" not in err and err.endswith("\n"), err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("selfsup: error: "), err
    assert all(line.startswith("\r") or "it/s" in line for line in err.split("\n")[:-2]), err
    return last


class _Payload:
    """A pickle that runs code when loaded: what weights_only=True must refuse unread."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * 60)
    return path


def test_pretrain_resume_refuses_bad_checkpoints_before_writing(tmp_path, corpus, capsys):
    import torch

    from selfsup.cli.main import main

    run = tmp_path / "run"
    assert main(["lm", "pretrain", "gpt", "--data", str(corpus), "--steps", "2",
                 "--eval-interval", "1", "--out", str(run), *TINY_GPT]) == 0  # fmt: skip
    last = run / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    command = (run / "command.txt").read_text()
    marker = tmp_path / "payload-ran"
    state = torch.load(last, weights_only=True)
    for name, data in [
        ("truncated", good[: len(good) // 2]),
        ("not a checkpoint", b"\x00\xffhello" * 10),
        ("pickled code", None),
    ]:
        if data is None:
            torch.save({**state, "extra": _Payload(marker)}, last)
        else:
            last.write_bytes(data)
        err = _one_line_error(
            ["lm", "pretrain", "gpt", "--resume", str(run), "--steps", "3"], capsys
        )
        assert f"{last} is not a readable checkpoint" in err, name
        assert (run / "command.txt").read_text() == command  # nothing written
    assert not marker.exists()  # the pickle was refused unread
    assert "refused unread" in err


def _sft_args(root: Path, out: Path, *more: str) -> list[str]:
    return ["lm", "sft", "--init", str(root / "base"), "--data", str(root / "sft.jsonl"),
            "--out", str(out), "--epochs", "1", "--batch-size", "8", "--max-length", "48",
            "--accelerator", "cpu", *more]  # fmt: skip


def test_sft_init_and_resume_refuse_bad_weights(tmp_path, chat_base, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    from selfsup.cli.main import main

    bad = tmp_path / "pickled"
    shutil.copytree(chat_base / "base", bad)
    weights = load_file(bad / "model.safetensors")
    (bad / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({**weights, "x": _Payload(marker)}, bad / "pytorch_model.bin")
    err = _one_line_error(
        ["lm", "sft", "--init", str(bad), "--data", str(chat_base / "sft.jsonl"), "--out",
         str(tmp_path / "a")], capsys,
    )  # fmt: skip
    assert "cannot load the model (a pickled file that is not plain weights" in err
    assert not marker.exists() and not (tmp_path / "a").exists()
    shutil.copytree(chat_base / "base", tmp_path / "truncated")
    data = (tmp_path / "truncated" / "model.safetensors").read_bytes()
    (tmp_path / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = _one_line_error(
        ["lm", "sft", "--init", str(tmp_path / "truncated"), "--data",
         str(chat_base / "sft.jsonl"), "--out", str(tmp_path / "b")], capsys,
    )  # fmt: skip
    assert "cannot load the model (SafetensorError" in err and not (tmp_path / "b").exists()
    # a finished run whose checkpoint is then damaged: --resume says so before writing
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(_sft_args(chat_base, run)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-3].startswith(f"run directory: {run}/") and "val loss" in out[-2]
    assert out[-1].startswith(f"next: selfsup lm chat {run}")
    # --resume RUN alone: --init, --data and --out are the run's own (finished: nothing to do)
    assert main(["lm", "sft", "--resume", str(run), "--epochs", "1", "--accelerator", "cpu"]) == 0
    command = (run / "command.txt").read_text()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 broken")
    err = _one_line_error(_sft_args(chat_base, run, "--resume", str(run)), capsys)
    assert "last.ckpt is not a readable checkpoint" in err
    assert (run / "command.txt").read_text() == command
    # the older bare --resume (the run in --out) still works, with a note
    assert main(_sft_args(chat_base, run, "--resume")) == 2
    err = capsys.readouterr().err
    assert "note: --resume without RUN is deprecated" in err and "last.ckpt is not a" in err
    err = _one_line_error(_sft_args(chat_base, run, "--resume", str(tmp_path / "other")), capsys)
    assert "names another" in err


def test_a_run_that_fails_at_its_first_step_leaves_no_folder(tmp_path, corpus, chat_base, capsys):
    from selfsup.cli.main import main

    # GPT: a learning rate that overflows the weights; the loss is NaN at step 2, before any
    # evaluation: the folder goes, and the same command with a sane --lr then runs into it.
    run = tmp_path / "gpt"
    args = ["lm", "pretrain", "gpt", "--data", str(corpus), "--steps", "3", "--eval-interval",
            "3", "--out", str(run), *TINY_GPT]  # fmt: skip
    err = _one_line_error([*args, "--lr", "1e38", "--grad-clip", "0"], capsys)
    assert "loss became nan" in err and "is removed" in err and not run.exists()
    assert main(args) == 0 and (run / "hf").is_dir()
    # SFT likewise
    sft_run = tmp_path / "sft"
    err = _one_line_error(_sft_args(chat_base, sft_run, "--lr", "1e38"), capsys)
    assert "loss became nan" in err and "is removed" in err and not sft_run.exists()
    # A folder left by a run killed before its first checkpoint (no exception to clean up
    # after) is reused by a fresh run; --resume says how to start afresh.
    sft_run.mkdir()
    (sft_run / "config.yaml").write_text("stage: sft\n")
    (sft_run / "command.txt").write_text("selfsup lm sft ...\n")
    err = _one_line_error(_sft_args(chat_base, sft_run, "--resume", str(sft_run)), capsys)
    assert "nothing to resume; run the command without --resume to start afresh" in err
    assert main(_sft_args(chat_base, sft_run)) == 0
    assert (sft_run / "checkpoints" / "last.ckpt").is_file()
    # a folder with anything else in it is still refused
    other = tmp_path / "mine"
    other.mkdir()
    (other / "config.yaml").write_text("x: 1\n")
    (other / "notes.txt").write_text("keep me")
    assert "already exists" in _one_line_error(_sft_args(chat_base, other), capsys)
    assert (other / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "option, value, words",  # (one wording for sft and lm pretrain: core's check_fields)
    [
        ("--lr", "nan", "--lr must be positive, got nan"),
        ("--lr", "-1e-3", "--lr must be positive, got -0.001"),
        ("--weight-decay", "-0.1", "--weight-decay must be zero or more, got -0.1"),
        ("--weight-decay", "nan", "--weight-decay must be zero or more, got nan"),
        ("--warmup-steps", "-1", "--warmup-steps must be zero or more, got -1"),
    ],
)
def test_bad_numeric_options_are_refused_before_any_folder(
    tmp_path, corpus, chat_base, capsys, option, value, words
):
    gpt = ["lm", "pretrain", "gpt", "--data", str(corpus), "--out", str(tmp_path / "g"),
           *TINY_GPT, f"{option}={value}"]  # fmt: skip
    assert words in _one_line_error(gpt, capsys) and not (tmp_path / "g").exists()
    sft_args = _sft_args(chat_base, tmp_path / "s", f"{option}={value}")
    assert words in _one_line_error(sft_args, capsys) and not (tmp_path / "s").exists()


def test_bad_precision_and_devices_are_one_line(tmp_path, corpus, chat_base, capsys):
    gpt = ["lm", "pretrain", "gpt", "--data", str(corpus), "--out", str(tmp_path / "g"),
           *TINY_GPT]  # fmt: skip
    assert "--precision 'fp8'" in _one_line_error([*gpt, "--precision", "fp8"], capsys)
    assert "--devices 'two'" in _one_line_error([*gpt, "--devices", "two"], capsys)
    sft_args = _sft_args(chat_base, tmp_path / "s", "--precision", "half")
    assert "--precision 'half'" in _one_line_error(sft_args, capsys)
    assert not (tmp_path / "g").exists() and not (tmp_path / "s").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_a_gpu_on_a_machine_without_one_is_one_line(tmp_path, corpus, chat_base, capsys):
    for accelerator in ("gpu", "cuda"):
        gpt = ["lm", "pretrain", "gpt", "--data", str(corpus), "--out", str(tmp_path / "g"),
               *TINY_GPT, "--accelerator", accelerator]  # fmt: skip
        assert "no CUDA GPU" in _one_line_error(gpt, capsys)
        sft_args = [*_sft_args(chat_base, tmp_path / "s")[:-2], "--accelerator", accelerator]
        assert "no CUDA GPU" in _one_line_error(sft_args, capsys)
    assert not (tmp_path / "g").exists() and not (tmp_path / "s").exists()


def test_reward_training_drops_full_tie_rankings_and_says_how_many(tmp_path, chat_base, capsys):
    from selfsup.cli.main import main

    tie = {
        "prompt": "what is 1 plus 1?",
        "completions": ["it is 2.", "it is 2."],
        "ranking": "A = B",
    }
    ordered = {"prompt": "what is 2 plus 2?", "completions": ["it is 4.", "it is 5."],
               "ranking": "A > B"}  # fmt: skip
    path = tmp_path / "rank.jsonl"
    # with --batch-size 2 the first batch would hold only ties (no pair: the loss is undefined)
    path.write_text("\n".join(json.dumps(r) for r in [tie, tie, tie, ordered, ordered]) + "\n")
    args = ["lm", "reward", "--init", str(chat_base / "base"), "--data", str(path), "--out",
            str(tmp_path / "rm"), "--epochs", "1", "--batch-size", "2", "--val-fraction", "0",
            "--max-length", "48", "--accelerator", "cpu"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{path}: 3 of 5 ranked prompts are full ties (no strictly ordered pair)" in out
    path.write_text("\n".join(json.dumps(r) for r in [tie, tie]) + "\n")
    args[args.index("--out") + 1] = str(tmp_path / "rm2")
    assert "every ranking is a full tie" in _one_line_error(args, capsys)
    assert not (tmp_path / "rm2").exists()


@pytest.mark.parametrize(
    "option, words",
    [
        ("--temperature=0", "--temperature must be positive"),
        ("--gamma=1.5", "--gamma must be between 0 and 1"),
        ("--lam=nan", "--lam must be between 0 and 1"),
        ("--lr=-1", "--lr must be positive"),
        ("--beta=-0.1", "--beta must be zero or more"),
        ("--ppo-epochs=0", "--ppo-epochs must be at least 1"),
        ("--target-kl=-1", "--target-kl must be zero or more"),
    ],
)
def test_bad_rlhf_options_are_one_line_before_anything_loads(tmp_path, capsys, option, words):
    none = str(tmp_path / "none")
    args = ["lm", "rlhf", "--policy", none, "--reward", none, "--prompts", none, "--out",
            str(tmp_path / "ppo"), option]  # fmt: skip
    assert words in _one_line_error(args, capsys)
    assert not (tmp_path / "ppo").exists()


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, chat_base) -> Path:
    from selfsup.cli.main import main

    out = tmp_path_factory.mktemp("chat-run") / "sft"
    assert main(_sft_args(chat_base, out)) == 0
    return out


def test_chat_longer_than_the_context_drops_the_oldest_turns(chat_run, monkeypatch, capsys):
    from transformers import GPT2LMHeadModel

    from selfsup.cli.main import main

    lengths = []
    generate = GPT2LMHeadModel.generate

    def recording(self, *args, **kwargs):
        lengths.append(kwargs["input_ids"].shape[1])
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GPT2LMHeadModel, "generate", recording)
    turns = ["what is 12 plus 30?"] * 5 + ["x" * 80, "what is 1 plus 2?", ""]
    replies = iter(turns)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    capsys.readouterr()
    assert main(["lm", "chat", str(chat_run), "--max-new-tokens", "8", "--system", "be brief"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant>") == 6  # every turn but the one too long for the model
    assert "oldest messages are left out" in out
    assert "selfsup: the message is" in out and "has no room for it" in out
    # the model (64 positions) was never given more than 64 - 8 prompt tokens
    assert len(lengths) == 6 and max(lengths) <= 64 - 8


def test_pretrain_init_refuses_a_pickled_checkpoint(tmp_path, corpus, chat_base, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    bad = tmp_path / "pickled"
    shutil.copytree(chat_base / "base", bad)
    weights = load_file(bad / "model.safetensors")
    (bad / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({**weights, "x": _Payload(marker)}, bad / "pytorch_model.bin")
    err = _one_line_error(
        ["lm", "pretrain", "gpt", "--data", str(corpus), "--init", str(bad), "--out",
         str(tmp_path / "run"), "--no-progress"], capsys,
    )  # fmt: skip
    assert "the weights could not be loaded (a pickled file that is not plain weights" in err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_label_and_best_of_n_options_are_one_line_before_loading(tmp_path, capsys):
    none = str(tmp_path / "none")
    label = ["lm", "label", none, "--prompts", none, "-o", str(tmp_path / "out.jsonl")]
    assert "--noise must be zero or more, got nan" in _one_line_error(
        [*label, "--noise", "nan"], capsys
    )
    best = ["lm", "best-of-n", "--policy", none, "--reward", none, "--prompts", none]
    assert "--max-new-tokens must be at least 1" in _one_line_error(
        [*best, "--max-new-tokens", "0"], capsys
    )
    assert "--no-end-score must be a finite" in _one_line_error(
        [*best, "--no-end-score", "nan"], capsys
    )
    assert not (tmp_path / "out.jsonl").exists()


def test_pretrain_reuses_the_leftover_of_a_killed_start_and_reads_configs_safely(
    tmp_path, corpus, capsys
):
    import shutil

    from selfsup.cli.main import main

    args = ["lm", "pretrain", "gpt", "--data", str(corpus), "--steps", "2", "--eval-interval",
            "1", *TINY_GPT]  # fmt: skip
    done = tmp_path / "done"
    assert main([*args, "--out", str(done)]) == 0
    # what a run killed before its first checkpoint leaves: config, command, tokenizer, ids
    left = tmp_path / "left"
    (left / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "command.txt", "tokenizer.json", "tokenizer_config.json",
                 "tokens.npy"):  # fmt: skip
        shutil.copy(done / name, left / name)
    err = _one_line_error(["lm", "pretrain", "gpt", "--resume", str(left)], capsys)
    assert "no checkpoint" in err and "without --resume" in err
    assert main([*args, "--out", str(left)]) == 0
    assert (left / "checkpoints" / "last.ckpt").is_file()
    assert (left / "command.txt").read_text().count("selfsup") == 1  # a fresh run's record
    # a damaged config.yaml of a run to resume
    (done / "config.yaml").write_bytes(b"\xff\xfe\x00binary")
    err = _one_line_error(["lm", "pretrain", "gpt", "--resume", str(done)], capsys)
    assert "config.yaml is not readable YAML" in err
    (done / "config.yaml").write_text("model: gpt\noptions: {n_layer: 1, colour: blue}\n")
    assert "colour" in _one_line_error(["lm", "pretrain", "gpt", "--resume", str(done)], capsys)
