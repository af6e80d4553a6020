"""NNCLR: the nearest-neighbour lookup by a naive loop, the loss against a float64 NT-Xent written
out and against lightly's, planted bugs those checks catch, the support set read before it is
written, and a short run on CIFAR-10 through `selfsup.pretrain` and the command line."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import selfsup
from selfsup.cli.main import build_parser, main
from selfsup.image.methods import nnclr
from selfsup.image.methods.nnclr import NNCLR, nearest_neighbours, nnclr_loss

pytestmark = pytest.mark.usefixtures("one_thread")
CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def model(**options: Any) -> NNCLR:
    info = {
        "dataset": {"channels": 1, "image_size": [8, 8], "num_classes": 10},
        "encoder": {"backbone": "convnet", "in_channels": 1, "small_images": True,
                    "mean": [0.3], "std": [0.3]},
    }  # fmt: skip
    return NNCLR.create(info, method="nnclr", **options)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def neighbours_by_loop(z: torch.Tensor, support: torch.Tensor) -> list[int]:
    best = []
    for q in z.tolist():
        sims = [cosine(q, s) for s in support.tolist()]
        best.append(max(range(len(sims)), key=sims.__getitem__))
    return best


def nt_xent_by_rows(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """NT-Xent in float64, one anchor at a time: row i of [a; b] has the positive i ± B and the
    other 2B - 2 rows as negatives; the mean of -log softmax over the 2B anchors."""
    z = F.normalize(torch.cat([a, b]).double(), dim=1)
    n = len(z)
    terms = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        logits = torch.stack([z[i] @ z[j] / t for j in others])
        terms.append(torch.logsumexp(logits, 0) - z[i] @ z[(i + n // 2) % n] / t)
    return torch.stack(terms).mean()


def support_set(k: int = 24, d: int = 5, seed: int = 0) -> torch.Tensor:
    """Rows of very different norms: the largest dot product is often not the largest cosine."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, k)[:, None]


def test_nearest_neighbour_is_the_support_row_of_largest_cosine_by_a_naive_loop() -> None:
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    support = support_set()
    best = neighbours_by_loop(z, support)
    assert best != (z @ support.T).argmax(1).tolist()  # the data tells normalising apart
    found = nearest_neighbours(z, support)
    torch.testing.assert_close(found, F.normalize(support[best].float(), dim=1))
    assert not nearest_neighbours(z.requires_grad_(), support).requires_grad


def loss_matches_the_formula(loss_fn: Callable[..., torch.Tensor]) -> bool:
    """Does loss_fn(z1, z2, p1, p2, support, t) give the float64 formula's value and gradient?"""
    g = torch.Generator().manual_seed(2)
    support = support_set(seed=1)
    z1, z2 = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    p1, p2 = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    nn1, nn2 = (support[neighbours_by_loop(z, support)] for z in (z1, z2))
    expected = lambda p1, p2: (nt_xent_by_rows(nn1, p2, 0.1) + nt_xent_by_rows(nn2, p1, 0.1)) / 2  # noqa: E731
    inputs = [t.clone().requires_grad_() for t in (z1, z2, p1, p2)]
    loss = loss_fn(*inputs, support, 0.1)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    p = [t.clone().requires_grad_() for t in (p1, p2)]
    want = expected(*p)
    want_grads = torch.autograd.grad(want, p)
    close = lambda a, b: torch.allclose(a.double(), b, rtol=1e-4, atol=1e-6)  # noqa: E731
    return (
        close(loss, want)
        and grads[0] is None  # no gradient through the lookup
        and grads[1] is None
        and all(close(a, b) for a, b in zip(grads[2:], want_grads, strict=True))
    )


def test_loss_is_the_symmetric_nt_xent_of_neighbours_and_predictions_by_formula() -> None:
    assert loss_matches_the_formula(nnclr_loss)


def test_the_formula_check_catches_planted_bugs(monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong_view(z1, z2, p1, p2, support, t):  # each view's neighbour against its own prediction
        return nnclr_loss(z2, z1, p1, p2, support, t)

    def no_stop_gradient(z1, z2, p1, p2, support, t):  # the projections themselves as positives
        return (nnclr.nt_xent(z1, p2, t) + nnclr.nt_xent(z2, p1, t)) / 2

    assert not loss_matches_the_formula(wrong_view)
    assert not loss_matches_the_formula(no_stop_gradient)
    lookup = nnclr.nearest_neighbours
    monkeypatch.setattr(nnclr, "nearest_neighbours", lambda z, s: lookup(z * 0 + s[0], s))
    assert not loss_matches_the_formula(nnclr_loss)  # a lookup that ignores the query
    monkeypatch.setattr(  # the largest dot product instead of the largest cosine
        nnclr, "nearest_neighbours", lambda z, s: F.normalize(s[(z @ s.T).argmax(1)].float(), dim=1)
    )
    assert not loss_matches_the_formula(nnclr_loss)


def test_loss_and_support_set_equal_lightlys_nnclr_on_the_same_tensors() -> None:
    pytest.importorskip("lightly")
    from lightly.loss import NTXentLoss
    from lightly.models.modules import NNMemoryBankModule

    b, d, k = 8, 6, 32
    ours = model(queue_size=k, projection_dim=d)
    bank = NNMemoryBankModule(size=(k, d))
    bank.bank.copy_(ours.queue)
    bank.bank_ptr.zero_()
    criterion = NTXentLoss(temperature=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # the second step looks up the first step's projections too
        # projections near queue entries (and near each other), of varied norms
        anchors = torch.cat([ours.queue, F.normalize(torch.randn(b, d, generator=g), dim=1)])
        picks = torch.randint(0, len(anchors), (b,), generator=g)
        z1 = (anchors[picks] + 0.3 * torch.randn(b, d, generator=g)) * 4
        z2 = (anchors[picks] + 0.3 * torch.randn(b, d, generator=g)) * 0.5
        p1, p2 = (torch.randn(b, d, generator=g, requires_grad=True) for _ in range(2))

        loss = nnclr_loss(z1, z2, p1, p2, ours.queue, ours.options.temperature)
        ours.enqueue(z1)
        grads = torch.autograd.grad(loss, [p1, p2])
        nn2 = bank(z2, update=False)
        nn1 = bank(z1, update=True)
        reference = 0.5 * (criterion(nn1, p2) + criterion(nn2, p1))
        reference_grads = torch.autograd.grad(reference, [p1, p2])

        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
        for a, r in zip(grads, reference_grads, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.queue, F.normalize(bank.bank, dim=1))
        assert int(ours.queue_ptr) == int(bank.bank_ptr)


def test_a_batch_never_is_its_own_neighbour_the_queue_takes_view_1_after_the_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    m = model(queue_size=64, projection_dim=8).train()
    looked_up: list[tuple[torch.Tensor, torch.Tensor]] = []  # (queries, neighbours)
    lookup = nnclr.nearest_neighbours

    def spy(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        found = lookup(z, support)
        looked_up.append((z.detach().clone(), found.clone()))
        return found

    monkeypatch.setattr(nnclr, "nearest_neighbours", spy)
    x = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    y = torch.zeros(16, dtype=torch.long)
    initial = m.queue.clone()
    m.pretext_loss(x, y, torch.Generator().manual_seed(0))
    assert len(looked_up) == 2  # one lookup per view
    (z1, nn1), (z2, nn2) = looked_up

    def gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # a's rows to b's nearest row
        return (a[:, None] - b[None]).abs().amax(dim=2).min(dim=1).values

    assert gap(torch.cat([nn1, nn2]), initial).max() < 1e-6  # entries of the queue as it was
    assert gap(torch.cat([nn1, nn2]), F.normalize(torch.cat([z1, z2]), dim=1)).min() > 1e-3
    torch.testing.assert_close(m.queue[:16], F.normalize(z1, dim=1))  # then view 1 went in
    torch.testing.assert_close(m.queue[16:], initial[16:])
    assert int(m.queue_ptr) == 16
    m.eval()  # in evaluation the support set is read, never written
    m.pretext_loss(x, y, torch.Generator().manual_seed(1))
    assert int(m.queue_ptr) == 16 and torch.equal(m.queue[:16], F.normalize(z1, dim=1))


@pytest.mark.skipif(not CIFAR.is_dir(), reason="needs ../shared/data/cifar10")
def test_nnclr_pretrains_on_cifar10_and_keeps_its_support_set_in_the_checkpoint(
    tmp_path: Path,
) -> None:
    with np.load(CIFAR / "test.npz") as f:
        x, y, classes = f["x"][:192], f["y"][:192], f["classes"]
    data = tmp_path / "cifar"
    data.mkdir()
    np.savez(data / "train.npz", x=x[:128], y=y[:128], classes=classes)
    np.savez(data / "test.npz", x=x[128:], y=y[128:], classes=classes)
    run = selfsup.pretrain(
        method="nnclr", data=f"npz:{data}", batch_size=64, epochs=1, out=str(tmp_path / "run"),
        queue_size=256, projection_dim=64, projection_hidden=128, predictor_hidden=128, seed=3,
    )  # fmt: skip
    assert (run / "encoder.safetensors").is_file()
    state = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    queue = state["queue"]
    assert queue.shape == (256, 64) and int(state["queue_ptr"]) == 128  # 2 steps of 64
    start = torch.randn(256, 64, generator=torch.Generator().manual_seed(3))  # from --seed
    torch.testing.assert_close(queue[128:], F.normalize(start, dim=1)[128:])  # not yet reached
    assert not torch.allclose(queue[:128], F.normalize(start, dim=1)[:128])
    torch.testing.assert_close(queue[:128].norm(dim=1), torch.ones(128))


def test_nnclr_is_on_the_command_line_with_its_own_options(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser(method="nnclr").parse_args(["pretrain", "nnclr", "--help"])
    shown = capsys.readouterr().out
    for flag in ("--queue-size", "--temperature", "--projection-dim", "--predictor-hidden"):
        assert flag in shown
    args = build_parser(method="nnclr").parse_args(["pretrain", "nnclr", "--queue-size", "8"])
    assert args.queue_size == 8
    assert main(["pretrain", "nnclr", "--temperature", "0"]) == 2
    assert "--temperature" in capsys.readouterr().err
    o = NNCLR.Options()
    assert (o.temperature, o.queue_size, o.predictor_hidden) == (0.1, 4096, 1024)
