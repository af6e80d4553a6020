"""Shared test fixtures."""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]  # tests/test_peer_oracles.py runs this conftest in a sub-run

# `pytest` runs the suite on pytest-xdist workers, one per core (pyproject: -n auto --dist
# loadgroup); each worker's torch, and the processes its tests start, take one thread: the
# workers are the parallelism, and two workers' thread pools would only wait on each other
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Run first, as whole groups (slowest first, so that no long group is left for the end while
# the other worker idles; seconds on the busy 2-core machine). A module is one group (its
# module-scoped fixtures are built once); every module that uses `digits_run` is the one group
# "digits", so that the session's SimCLR run is trained once and no two workers write into it.
SLOW_FIRST = (
    "test_gpu_script",  # 164 s
    "digits",  # 220 s
    "test_edges",  # 76 s
    "test_evaluation",  # 54 s
    "test_gpt",  # 37 s
    "test_hostile_images",
    "test_accumulate",
    "test_noncontrastive",
    "test_pretext",
    "test_cli_grammar",
    "test_probe",
    "test_colorization",
    "test_rlhf",
    "test_distributed",
)
# the launch variables Lightning's process launchers leave in os.environ (MASTER_PORT: the free
# port it found), which a later test's processes would otherwise reuse while it may be taken
LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """-n auto: a worker per core for the whole suite (`pytest`); none for a run that names its
    tests (`pytest tests/test_x.py`), where starting workers costs more than they save."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return 0
    return None  # xdist's own hook: the cores this process may use


@pytest.hookimpl(tryfirst=True)  # before xdist's worker turns the marks into groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under --dist loadgroup: the groups of SLOW_FIRST's comment, slowest first."""
    if config.getoption("dist", "no") != "loadgroup":
        return
    modules: dict[str, str] = {}
    for item in items:
        module = item.path.stem
        if "digits_run" in getattr(item, "fixturenames", ()) or modules.get(module) == "digits":
            modules[module] = "digits"
        modules.setdefault(module, module)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(modules[item.path.stem]))
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(modules[item.path.stem], len(rank)))  # stable


@pytest.fixture(autouse=True)
def no_stale_launch_variables() -> Iterator[None]:
    """A test's multi-process run leaves no MASTER_PORT (or rank) behind for the next test."""
    before = {name: os.environ.get(name) for name in LAUNCH_VARS}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True, scope="session")
def no_automatic_reports() -> Iterator[None]:
    """`pretrain` and `evaluate` write RUN/report.html at their end (a t-SNE, a few figures):
    off for the suite's many short runs; tests/test_report.py turns it on where it checks it."""
    before = os.environ.get("SELFSUP_REPORT")
    os.environ["SELFSUP_REPORT"] = "0"
    yield
    if before is None:
        os.environ.pop("SELFSUP_REPORT", None)
    else:
        os.environ["SELFSUP_REPORT"] = before


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one torch thread, above all on a busy 2-core machine; a module
    asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SimCLR trained on scikit-learn's digits with `selfsup demo`'s settings, 25 epochs (about a
    minute on two cores), shared by the tests that need an encoder which has learned something."""
    import selfsup
    from selfsup.cli.demo import DEMO

    # one thread, as the demo runs it: the run (and what the tests measure on it) must not
    # depend on which test happens to ask for it first, under which thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return selfsup.pretrain(DEMO, epochs=25, out=str(tmp_path_factory.mktemp("digits") / "run"))
    finally:
        torch.set_num_threads(threads)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI=true a test skipped for a module it could not import fails instead: CI installs
    every peer an oracle test compares against (the dev extra), so such a skip is a missing
    install, not a test that may go unrun. Other skips (no CUDA, no Chromium) stay skips."""
    outcome = yield
    report = outcome.get_result()
    reason = str(call.excinfo.value) if call.excinfo else ""
    if report.skipped and os.environ.get("CI") == "true" and reason.startswith("could not import"):
        report.outcome = "failed"
        report.longrepr = f"{reason} -- CI installs it with pip install -e '.[dev]' (CI=true)"


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> Path:
    """A tiny GPT-2 with a character tokenizer, and a few conversations beside it (sft.jsonl)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from selfsup.core.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("chat")
    tokenizer = train_tokenizer(["0123456789 abcdefghijklmnopqrstuvwxyz?."], kind="char")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1,
                        n_head=2, bos_token_id=0, eos_token_id=0)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    lines = [
        {"prompt": f"what is {i} plus {i}?", "completion": f"it is {2 * i}."} for i in range(24)
    ]
    (root / "sft.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root
