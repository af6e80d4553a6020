"""Negatives gathered across processes: 2 gloo processes match one process on the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfsup.engine.distributed import gather_with_grad, rank, unique_ids, world_size
from selfsup.image.losses.clip import clip_loss
from selfsup.image.losses.contrastive import info_nce, nt_xent

WORKER = Path(__file__).parent / "_ddp_worker.py"
T = 0.3  # as in the worker


def test_gather_with_grad_is_identity_without_process_group() -> None:
    t = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(t) is t
    assert (world_size(), rank()) == (1, 0)
    assert torch.equal(unique_ids(3), torch.arange(3))


def test_gather_flag_without_process_group_changes_nothing() -> None:
    z, ids = torch.randn(8, 5, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])
    torch.testing.assert_close(info_nce(z, ids, T, gather=True), info_nce(z, ids, T))
    torch.testing.assert_close(nt_xent(z[:4], z[4:], T, gather=True), nt_xent(z[:4], z[4:], T))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun picks a free port itself (no race between finding and binding one)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(WORKER), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_gather_with_grad_concatenates_and_sums_gradients_over_ranks(ranks: list[dict]) -> None:
    for r, result in enumerate(ranks):
        assert result["gathered"].tolist() == [0, 0, 1, 1]
        # rank s weighs gathered row k by (s+1)·k: rank r's rows get (1+2)·k summed over ranks
        assert result["gather_grad"].tolist() == [3 * k for k in (2 * r, 2 * r + 1)]


def reference(case: str, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and gradients of one process on the whole batch (no process group here)."""
    z1, z2, z = (inputs[k].clone().requires_grad_() for k in ("z1", "z2", "z"))
    y, ids = inputs["y"], inputs["ids"]
    if case == "simclr":
        loss = nt_xent(z1, z2, T)
    elif case == "supcon":  # labels where labeled, an id of its own per unlabeled sample
        own = torch.where(y >= 0, y, -100 - torch.arange(len(y)))
        loss = info_nce(torch.cat([z1, z2]), own.repeat(2), T)
    elif case == "uneven":
        loss = info_nce(z, ids, T)
    elif case == "clip":  # CLIP: image z1[i] and caption z2[i] are a pair
        loss = clip_loss(z1, z2, 1 / T)
    else:  # no_gather: each process on its own half, losses averaged
        loss = (info_nce(z[:6], ids[:6], T) + info_nce(z[6:], ids[6:], T)) / 2
    grads = torch.autograd.grad(loss, [z1, z2, z], allow_unused=True, materialize_grads=True)
    return loss.detach(), list(grads)


@pytest.mark.parametrize("case", ["simclr", "supcon", "uneven", "no_gather", "clip"])
def test_gathered_loss_and_ddp_gradient_equal_single_process(case: str, ranks: list[dict]) -> None:
    expected_loss, expected_grads = reference(case, ranks[0]["inputs"])
    for result in ranks:
        torch.testing.assert_close(result[case]["loss"], expected_loss)
        for got, expected in zip(result[case]["grads"], expected_grads, strict=True):
            torch.testing.assert_close(got, expected)
    assert any(g.abs().sum() > 0 for g in expected_grads)


def test_each_rank_returns_its_share_of_the_loss(ranks: list[dict]) -> None:
    # uneven: rank 0 has 4 anchors with a positive, rank 1 all 6, so the shares differ
    shares = [result["uneven"]["local_loss"] for result in ranks]
    assert not torch.isclose(shares[0], shares[1])
    torch.testing.assert_close((shares[0] + shares[1]) / 2, ranks[0]["uneven"]["loss"])
