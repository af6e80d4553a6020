"""SimPO (Meng et al., 2024): the loss against the paper's formula in float64 and against TRL's
CPO trainer (loss_type="simpo"), and `selfsup lm simpo` end to end on the tiny SFT model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from test_alignment import _gold_pairs
from test_rlhf import sft_run, task  # noqa: F401  (module fixtures)

from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.lm.alignment.simpo import simpo_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(seed: int, n: int = 6) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logps = [-30 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(2)]
    lengths = [torch.randint(1, 12, (n,), generator=g).double() for _ in range(2)]
    return (*logps, *lengths)


def test_simpo_loss_is_the_papers_formula_in_float64() -> None:
    lc, lr, nc, nr = _pairs(0)
    beta, gamma = 2.5, 1.4
    loss, chosen, rejected = simpo_loss(lc.float(), lr.float(), nc.float(), nr.float(), beta, gamma)
    rows = zip(lc.tolist(), lr.tolist(), nc.tolist(), nr.tolist(), strict=True)
    by_hand = [
        -math.log(1 / (1 + math.exp(-(beta * a / m - beta * b / k - gamma)))) for a, b, m, k in rows
    ]
    assert loss.item() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)
    torch.testing.assert_close(chosen.double(), beta * lc / nc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rejected.double(), beta * lr / nr, rtol=1e-5, atol=1e-5)
    # d loss / d logp_chosen = -(1 - σ(margin)) β / (|y_c| P): up for chosen, down for rejected
    lc_, lr_ = lc.clone().requires_grad_(), lr.clone().requires_grad_()
    simpo_loss(lc_, lr_, nc, nr, beta, gamma)[0].backward()
    margin = beta * lc / nc - beta * lr / nr - gamma
    expected = -(1 - torch.sigmoid(margin)) * beta / nc / len(lc)
    torch.testing.assert_close(lc_.grad, expected)
    torch.testing.assert_close(lr_.grad, (1 - torch.sigmoid(margin)) * beta / nr / len(lc))


def test_simpo_refuses_an_answer_of_no_tokens() -> None:
    lc, lr, nc, nr = _pairs(1, 3)
    nc[1] = 0
    with pytest.raises(SelfsupError, match="length"):
        simpo_loss(lc, lr, nc, nr, 2.0, 1.0)


def test_simpo_loss_matches_trls_cpo_simpo() -> None:
    pytest.importorskip("trl")
    from types import SimpleNamespace

    try:
        from trl.experimental.cpo.cpo_trainer import CPOTrainer
    except ImportError:
        from trl import CPOTrainer
    lc, lr, nc, nr = (x.float() for x in _pairs(2))
    beta, gamma = 2.0, 0.8
    # TRL's SimPO takes the answers' mean log-probabilities (average_log_prob for "simpo")
    cpu = SimpleNamespace(device="cpu")
    trainer = SimpleNamespace(beta=beta, simpo_gamma=gamma, loss_type="simpo", alpha=0.0,
                              label_smoothing=0.0, accelerator=cpu)  # fmt: skip
    losses, chosen, rejected = CPOTrainer.cpo_loss(trainer, lc / nc, lr / nr)
    ours, our_chosen, our_rejected = simpo_loss(lc, lr, nc, nr, beta, gamma)
    assert ours.item() == pytest.approx(losses.mean().item(), rel=1e-6)
    torch.testing.assert_close(our_chosen, chosen)
    torch.testing.assert_close(our_rejected, rejected)


def test_simpo_command_trains_without_a_reference(task, sft_run, capsys) -> None:  # noqa: F811
    _gold_pairs(task / "simpo-pairs.jsonl", 32, seed=9)
    out = task / "simpo"
    data = task / "simpo-pairs.jsonl"
    assert main(["lm", "simpo", "--init", str(sft_run), "--data", str(data), "--out", str(out),
                 "--batch-size", "16", "--lr", "1e-3", "--gamma", "0.5", "--max-length", "64",
                 "--val-fraction", "0.25", "--accelerator", "cpu"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("val reward acc ") and lines[-1].startswith("next: selfsup")
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_loss", "val_reward_acc", "val_margin"} <= set(header)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["stage"], config["beta"], config["gamma"]) == ("simpo", 2.0, 0.5)
    assert (out / "hf" / "config.json").is_file() and json.loads(
        (out / "hf" / "config.json").read_text()
    )
    assert main(["lm", "simpo", "--init", "x", "--data", "y", "--out", "z", "--gamma", "-1"]) == 2
    assert "--gamma must be zero or more, got -1.0" in capsys.readouterr().err
