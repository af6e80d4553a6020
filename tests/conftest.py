"""Shared test fixtures."""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]  # tests/test_peer_oracles.py runs this conftest in a sub-run


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
