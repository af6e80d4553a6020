"""The `selfsup lm` grammar (issue 19): instant help without torch, the vocabulary shared with
the image side, deprecated spellings, presets, --config, and the closing summaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import selfsup
from selfsup.cli.main import main

SRC = str(Path(selfsup.__file__).resolve().parents[1])
TRAINING = [
    ["lm", "pretrain", "gpt"],
    ["lm", "pretrain", "bert"],
    ["lm", "pretrain", "word2vec"],
    ["lm", "sft"],
    ["lm", "reward"],
    ["lm", "rlhf"],
    ["lm", "icl", "regression"],
]
TINY = ["--block-size", "8", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--batch-size", "4", "--eval-batches", "1", "--final-eval-batches", "1",
        "--accelerator", "cpu", "--no-progress"]  # fmt: skip


def _help(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("selfsup: error: ") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", [["lm"], ["lm", "pretrain", "gpt"], ["lm", "sft"]])
def test_help_imports_no_torch(command):
    code = (
        "import sys\nfrom selfsup.cli.main import main\n"
        f"try:\n    main({[*command, '--help']!r})\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'lightning', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "usage: selfsup" in done.stdout
    assert done.stdout.rstrip().endswith("HEAVY []"), done.stdout[-300:]


@pytest.mark.parametrize("command", TRAINING, ids=" ".join)
def test_training_commands_share_the_vocabulary(command, capsys):
    text = _help(command, capsys)
    assert "--progress, --no-progress" in text
    assert "(default: )" not in text and "(default: None)" not in text
    if command[1] != "icl":
        assert "--seed SEED" in text and "--accelerator" in text
    if command[1] in ("pretrain", "sft", "reward"):
        assert "--data DATA" in text and "--corpus" not in text
    if command[1] in ("pretrain", "sft", "reward") and command[-1] != "word2vec":
        assert "--resume [RUN]" in text or "--resume RUN" in text


@pytest.mark.parametrize(
    "command",
    [
        "tokenize",
        "generate",
        "label",
        "best-of-n",
        "chat",
        "icl few-shot",
        "neighbors",
        "fill-mask",
        "arithmetic",
    ],  # fmt: skip
)
def test_no_option_shows_an_empty_default(command, capsys):
    text = _help(["lm", *command.split()], capsys)
    assert "(default: )" not in text and "(default: None)" not in text


def test_required_options_are_marked_and_enforced(capsys):
    text = " ".join(_help(["lm", "rlhf"], capsys).split("options:")[1].split())
    for option in ("--policy POLICY", "--reward REWARD", "--prompts PROMPTS", "--out OUT"):
        # required on the command line or in the --config file, so argparse does not enforce it
        described = text.split(option, 1)[1].split(" --")[0]
        assert described.endswith("(required)"), described
    assert "(required)" not in text.split("--eval-prompts", 1)[1].split(" --out")[0]
    err = _error(["lm", "rlhf", "--reward", "r", "--prompts", "p.jsonl", "--out", "o"], capsys)
    assert "required: --policy" in err


def test_arithmetic_counts_prompts_with_num_prompts(tmp_path, capsys):
    assert main(["lm", "arithmetic", str(tmp_path / "a"), "--sft", "4", "--num-prompts", "6"]) == 0
    assert len((tmp_path / "a" / "rl.jsonl").read_text().splitlines()) == 6
    capsys.readouterr()
    # the old spelling still works, with a note
    assert main(["lm", "arithmetic", str(tmp_path / "b"), "--sft", "4", "--prompts", "3"]) == 0
    assert "--prompts is deprecated; use --num-prompts" in capsys.readouterr().err
    assert len((tmp_path / "b" / "rl.jsonl").read_text().splitlines()) == 3


def test_corpus_is_a_deprecated_spelling_of_data(tmp_path, capsys):
    missing = tmp_path / "no-such-corpus.txt"
    argv = ["lm", "pretrain", "gpt", "--corpus", str(missing), "--out", str(tmp_path / "r")]
    err = _error(argv, capsys)
    assert "selfsup: note: --corpus is deprecated; use --data" in err
    assert str(missing) in err.split("selfsup: error: ")[1]  # the value went to --data
    err = _error(["lm", "pretrain", "gpt", "--out", str(tmp_path / "r")], capsys)
    assert "--data is required" in err
    err = _error([*argv, "--preset", "baby"], capsys)  # parsed twice, noted once
    assert err.count("note: --corpus") == 1 and str(missing) in err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * 40)
    return path


@pytest.fixture(scope="module")
def preset_run(corpus, tmp_path_factory) -> tuple[Path, str]:
    """A two-step GPT from --preset baby-fast, its flags overriding the preset's."""
    import torch

    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("runs") / "gpt"
    argv = ["lm", "pretrain", "gpt", "--preset", "baby-fast", "--data", str(corpus),
            "--steps", "2", "--eval-interval", "1", "--warmup-steps", "1", "--out", str(run),
            *TINY]  # fmt: skip
    out = _stdout_of(argv)
    return run, out


def _stdout_of(argv: list[str]) -> str:
    """Run `selfsup ARGV` in this process; its standard output."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv) == 0
    return buffer.getvalue()


def test_preset_gives_settings_and_flags_override_them(preset_run):
    run, _ = preset_run
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lr"] == 4e-3 and saved["min_lr_fraction"] == 0.1  # baby-fast's
    assert saved["steps"] == 2 and saved["options"]["block_size"] == 8  # the flags'
    assert saved["data"] and "corpus" not in saved


def test_pretrain_prints_validation_lines_and_a_summary(preset_run):
    run, out = preset_run
    lines = out.strip().splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("step ")] == [
        "step 1/2",
        "step 2/2",
    ]
    results = json.loads((run / "results.json").read_text())
    tail = lines[-3:]
    assert tail[0].startswith(f"run directory: {run}/")
    assert f"validation loss {results['val_loss']:.4f}" in tail[1]
    assert tail[2] == f"next: selfsup lm generate {run} --prompt 'ROMEO:'"


def test_a_runs_config_yaml_repeats_it(preset_run, tmp_path, capsys):
    run, _ = preset_run
    again = tmp_path / "again"
    _stdout_of(
        [
            "lm",
            "pretrain",
            "gpt",
            "--config",
            str(run / "config.yaml"),
            "--out",
            str(again),
            "--eval-batches",
            "2",
        ]  # fmt: skip
    )
    first = yaml.safe_load((run / "config.yaml").read_text())
    second = yaml.safe_load((again / "config.yaml").read_text())
    assert second.pop("eval_batches") == 2 and first.pop("eval_batches") == 1  # the flag wins
    assert {**first, "out": None} == {**second, "out": None}
    assert (run / "tokens.npy").read_bytes() == (again / "tokens.npy").read_bytes()


def test_config_file_errors_are_one_line(preset_run, tmp_path, capsys):
    run, _ = preset_run
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    assert "'stepz' is not an option" in _error(
        ["lm", "pretrain", "gpt", "--config", str(bad)], capsys
    )
    bert = tmp_path / "bert.yaml"
    bert.write_text((run / "config.yaml").read_text().replace("model: gpt", "model: bert"))
    err = _error(["lm", "pretrain", "gpt", "--config", str(bert), "--out", "x"], capsys)
    assert "use `selfsup lm pretrain bert`" in err
    nested = tmp_path / "nested.yaml"
    nested.write_text("options:\n  n_layer: two\n")
    assert "n_layer must be int" in _error(
        ["lm", "pretrain", "gpt", "--config", str(nested)], capsys
    )


def test_few_shot_counts_questions_with_limit(tmp_path, capsys):
    text = _help(["lm", "icl", "few-shot"], capsys)
    assert "--limit LIMIT" in text and "--questions" not in text
    argv = ["lm", "icl", "few-shot", str(tmp_path / "no-run"), "--data", str(tmp_path / "p.jsonl")]
    err = _error([*argv, "--questions", "5"], capsys)
    assert "note: --questions is deprecated; use --limit" in err


def test_word2vec_summary_and_config(corpus, tmp_path):
    first, again = tmp_path / "w2v", tmp_path / "again"
    argv = ["lm", "pretrain", "word2vec", "--data", str(corpus), "--min-count", "1", "--dim",
            "4", "--epochs", "1", "--no-progress", "--out", str(first)]  # fmt: skip
    tail = _stdout_of(argv).strip().splitlines()[-3:]
    words = json.loads((first / "results.json").read_text())["words"]
    assert tail[0].startswith(f"run directory: {first}/")
    assert tail[1].startswith(f"{words:,} words in ")
    assert tail[2] == f"next: selfsup lm neighbors {first} WORD"
    _stdout_of(["lm", "pretrain", "word2vec", "--config", str(first / "config.yaml"), "--out",
                str(again)])  # fmt: skip
    saved = [yaml.safe_load((r / "config.yaml").read_text()) for r in (first, again)]
    assert {**saved[0], "out": ""} == {**saved[1], "out": ""}


def test_devices_auto_means_every_gpu_or_one_cpu_process():
    from selfsup.engine.trainer import lightning_devices as _devices

    assert _devices("auto", on_gpu=False) == 1
    assert _devices("3", on_gpu=False) == 3 and _devices("0,1", on_gpu=True) == "0,1"
    assert _devices("auto", on_gpu=True) == max(1, __import__("torch").cuda.device_count())


def test_usage_mistakes_of_lm_pretrain_are_told_before_torch_is_imported(tmp_path):
    code = (
        "import sys\nfrom selfsup.cli.main import main\n"
        f"code = main(['lm', 'pretrain', 'gpt', '--data', {str(tmp_path)!r}, '--steps', '0'])\n"
        "print('EXIT', code, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "EXIT 2 False", done.stdout + done.stderr
    assert done.stderr == "selfsup: error: --steps must be at least 1, got 0\n"


@pytest.mark.parametrize("kind", ["gpt", "bert", "word2vec"])
def test_a_kinds_options_and_about_read_from_its_source_equal_the_imported_class(kind):
    """What `selfsup lm pretrain KIND` reads by `ast` (flags, ranges, help, defaults, presets)
    is what training imports."""
    import dataclasses
    import typing

    from selfsup.core.config import type_of
    from selfsup.lm.methods import PRETRAIN
    from selfsup.lm.options import LMConfig

    cls = PRETRAIN.load(kind)
    hints = typing.get_type_hints(cls.Options)
    imported = {f.name: (f.default, dict(f.metadata)) for f in dataclasses.fields(cls.Options)}
    read = {s.name: (s.default, {"help": s.help, **s.metadata}) for s in PRETRAIN.options(kind)}
    assert read == imported and read
    for spec in PRETRAIN.options(kind):
        assert type_of(spec.type) in (*typing.get_args(hints[spec.name]), hints[spec.name])
    about = PRETRAIN.about(kind)
    assert about["help"] == cls.help
    assert about.get("defaults", {}) == getattr(cls, "defaults", {})
    assert about.get("presets", {}) == getattr(cls, "presets", {})
    shared = {f.name for f in dataclasses.fields(LMConfig)}
    if "entry" in about:  # its own loop: its Options are all its flags
        assert callable(getattr(__import__(cls.__module__, fromlist=["_"]), about["entry"]))
    else:  # LMConfig's flags beside its own: no name twice, its defaults LMConfig's options
        assert not shared & read.keys() and set(about.get("defaults", {})) <= shared
        for preset in about.get("presets", {}).values():
            assert set(preset) <= shared | read.keys()


def test_bad_ranges_of_lm_pretrain_are_one_line_before_torch_is_imported(tmp_path):
    """Each kind's `check=` ranges (LMConfig's and its own Options', read from the source) and
    the shared seed and precision checks refuse a value in one line, before torch loads."""
    from selfsup.core.config import SEED_MAX

    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n")
    cases = [
        ("gpt", ["--lr", "-1"], "--lr must be positive, got -1.0"),
        ("gpt", ["--seed", "-1"], f"--seed must be a whole number from 0 to {SEED_MAX}, got -1"),
        ("gpt", ["--precision", "fp8"], "--precision 'fp8' is unknown; expected one of"),
        ("gpt", ["--beta2", "1"], "--beta2 must be at least 0 and below 1, got 1.0"),
        ("gpt", ["--n-layer", "0"], "--n-layer must be at least 1, got 0"),
        ("gpt", ["--dropout", "1"], "--dropout must be at least 0 and below 1, got 1.0"),
        ("bert", ["--mask-prob", "0"], "--mask-prob must be between 0 and 1 (exclusive), got 0.0"),
        ("bert", ["--max-length", "4"], "--max-length must be at least 5, got 4"),
        ("word2vec", ["--window", "0"], "--window must be at least 1, got 0"),
        ("word2vec", ["--sample", "nan"], "--sample must be zero or more, got nan"),
        (
            "word2vec",
            ["--seed", str(SEED_MAX + 1)],
            f"--seed must be a whole number from 0 to {SEED_MAX}, got {SEED_MAX + 1}",
        ),
    ]
    code = (
        "import sys\nfrom selfsup.cli.main import main\n"
        f"for kind, args in {[(k, a) for k, a, _ in cases]!r}:\n"
        f"    assert main(['lm', 'pretrain', kind, '--data', {str(corpus)!r}, *args]) == 2\n"
        "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == len(cases), done.stderr
    for line, (_, _, words) in zip(lines, cases, strict=True):
        assert line.startswith("selfsup: error: " + words), line


def test_python_callers_get_the_same_checks(tmp_path):
    from selfsup.core.errors import SelfsupError
    from selfsup.lm.models.gpt import Options
    from selfsup.lm.training.pretrain import pretrain_lm

    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n")
    with pytest.raises(SelfsupError, match="^--n-embd must be at least 1, got 0$"):
        pretrain_lm(options=Options(n_embd=0), data=str(corpus), out=str(tmp_path / "r"))
    with pytest.raises(SelfsupError, match="^--seed must be a whole number"):
        pretrain_lm(data=str(corpus), seed=-1, out=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_sft_no_resume_is_a_deprecated_no_op(tmp_path, capsys):
    argv = ["lm", "sft", "--init", str(tmp_path / "none"), "--data", str(tmp_path / "c.jsonl"),
            "--out", str(tmp_path / "run"), "--no-resume"]  # fmt: skip
    err = _error(argv, capsys)
    assert "note: --no-resume is deprecated; leave it out" in err
    assert "--resume" not in err.split("selfsup: error: ")[1]  # a new run, not a resumed one
    assert not (tmp_path / "run").exists()


def _captured_stage(monkeypatch, module: str, name: str, tmp_path: Path) -> list:
    """Replace the training function `module.name` with one that records its config."""
    import importlib

    seen: list = []

    def record(config, command=None):
        seen.append(config)
        (tmp_path / "recorded").mkdir(exist_ok=True)
        return tmp_path / "recorded"

    monkeypatch.setattr(importlib.import_module(module), name, record)
    return seen


def test_sft_config_file_sets_options_and_flags_override_it(monkeypatch, tmp_path, capsys):
    seen = _captured_stage(monkeypatch, "selfsup.lm.alignment.sft", "sft", tmp_path)
    file = tmp_path / "sft.yaml"
    file.write_text("init: base\ndata: chats.jsonl\nout: from-file\nepochs: 7\nlr: 0.002\n")
    assert main(["lm", "sft", "--config", str(file), "--lr", "0.005"]) == 0
    config = seen[-1]
    assert (config.init, config.data, config.out) == ("base", "chats.jsonl", "from-file")
    assert (config.epochs, config.lr) == (7, 0.005)  # the file's epochs, the flag's lr
    # a run's own config.yaml (which records its stage) repeats it in a new --out
    saved = {"stage": "sft", "init": "base", "data": "chats.jsonl", "out": "old-run", "epochs": 2,
             "resume": None, "progress": None}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(saved))
    assert main(["lm", "sft", "--config", str(tmp_path / "run.yaml"), "--out", "new"]) == 0
    assert (seen[-1].out, seen[-1].epochs, seen[-1].resume) == ("new", 2, None)
    err = _error(["lm", "reward", "--config", str(tmp_path / "run.yaml"), "--out", "x"], capsys)
    assert "options of a sft run; use `selfsup lm sft`" in err
    file.write_text("init: base\nbeta: 0.1\n")
    assert "'beta' is not an option" in _error(["lm", "sft", "--config", str(file)], capsys)


def test_rlhf_required_options_may_come_from_the_config_file(monkeypatch, tmp_path, capsys):
    seen = _captured_stage(monkeypatch, "selfsup.lm.alignment.rlhf", "rlhf", tmp_path)
    file = tmp_path / "rlhf.yaml"
    file.write_text("policy: sft\nreward: rm\nprompts: p.jsonl\nbeta: 0.2\n")
    err = _error(["lm", "rlhf", "--config", str(file)], capsys)
    assert "the following arguments are required: --out;" in err
    assert main(["lm", "rlhf", "--config", str(file), "--out", "o", "--iterations", "3"]) == 0
    config = seen[-1]
    assert (config.policy, config.reward, config.prompts, config.out) == (
        "sft",
        "rm",
        "p.jsonl",
        "o",
    )
    assert (config.beta, config.iterations) == (0.2, 3)


@pytest.mark.parametrize(
    "command",
    [
        ["lm", "sft", "--init", "i", "--data", "d", "--out"],
        ["lm", "reward", "--init", "i", "--data", "d", "--out"],
        ["lm", "rlhf", "--policy", "p", "--reward", "r", "--prompts", "q", "--out"],
        ["lm", "grpo", "--policy", "p", "--reward", "r", "--prompts", "q", "--out"],
        ["lm", "dpo", "--init", "i", "--data", "d", "--out"],
        ["lm", "pretrain", "word2vec", "--data", "d", "--out"],
    ],
    ids=lambda c: " ".join(c[:3]),
)
def test_one_process_stages_refuse_several_devices_and_unknown_precision(command, tmp_path, capsys):
    out = str(tmp_path / "run")
    if command[1] == "pretrain":  # the others train on several processes (test_lm_devices.py)
        err = _error([*command, out, "--devices", "2"], capsys)
        assert "--devices 2: this stage trains in one process on one device" in err
    else:
        err = _error([*command, out, "--devices", "64", "--accelerator", "cpu"], capsys)
        assert "--devices 64 --accelerator cpu: this machine has" in err
    err = _error([*command, out, "--precision", "half-ish"], capsys)
    assert "--precision 'half-ish'" in err and "expected one of" in err  # (word2vec: core's)
    assert not (tmp_path / "run").exists()


def test_icl_regression_ends_with_a_summary(tmp_path, capsys):
    plot = tmp_path / "icl.png"
    argv = ["lm", "icl", "regression", "--steps", "5", "--dims", "2", "--points", "6",
            "--no-progress", "-o", str(plot)]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table = {int(row.split()[0]): row.split()[1:] for row in lines if row[:3].strip().isdigit()}
    assert sorted(table) == list(range(6)) and plot.stat().st_size > 0
    assert lines[-3].startswith(f"plot: {plot} ")
    transformer, least_squares, three_nn = table[4][:3]  # k = 2d
    assert lines[-2] == (
        f"at k = 4: transformer {transformer}, least squares {least_squares}, 3-NN {three_nn}"
    )
    assert lines[-1].endswith("selfsup lm icl regression --dims 2 --points 6 --steps 10")


def test_a_gpt_run_leaves_samples_for_its_report(preset_run, corpus):
    run, _ = preset_run
    samples = (run / "samples.txt").read_text().split("\n---------------\n")
    assert len(samples) == 3 and all(s.strip() for s in samples)
    assert set("".join(samples)) <= set(corpus.read_text()) | {"\n"}  # the corpus's characters
