"""The block-wise InfoNCE (selfsup.image.losses.chunked) against the plain reference, in float64."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from selfsup.image.losses import chunked
from selfsup.image.losses.chunked import weighted_lse
from selfsup.image.losses.contrastive import info_nce, info_nce_reference, nt_xent, supcon_ids


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows, so every test crosses block boundaries (and a ragged last block)."""
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 3 * 37)


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()


@pytest.mark.parametrize("scale", [0.3, 30.0])  # the bound shift, and exact row maxima
def test_weighted_lse_matches_logsumexp(small_blocks: None, scale: float) -> None:
    q, k = randn(11, 5, seed=1, scale=scale), randn(37, 5, seed=2)
    weights = torch.rand(11, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    self_cols = torch.randperm(37, generator=torch.Generator().manual_seed(4))[:11]
    logits = (q @ k.T).index_put(
        (torch.arange(11), self_cols), torch.tensor(-torch.inf, dtype=q.dtype)
    )
    expected = (torch.logsumexp(logits, dim=1) * weights).sum()
    got = weighted_lse(q, k, weights, self_cols)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(3 * got, [q, k])
    for g, e in zip(grads, torch.autograd.grad(3 * expected, [q, k]), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


ID_PATTERNS = {
    "simclr": torch.arange(20).repeat(2),
    "multiview": torch.arange(7).repeat(4),
    "supcon": supcon_ids(torch.tensor([0, 1, -1, 2, 1, 0, -1, 2, 2, 0, 1, -1, 3]).repeat(2)),
    "some_alone": torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 6, 6, 6, 7]),
}


@pytest.mark.parametrize("pattern", list(ID_PATTERNS))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("t", [0.05, 0.5])
def test_info_nce_equals_reference_values_and_grads(
    small_blocks: None, pattern: str, normalize: bool, t: float
) -> None:
    ids = ID_PATTERNS[pattern]
    z = randn(len(ids), 6, seed=len(ids), scale=3.0)
    loss, ref = info_nce(z, ids, t, normalize), info_nce_reference(z, ids, t, normalize)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    (grad,), (ref_grad,) = torch.autograd.grad(loss, z), torch.autograd.grad(ref, z)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_float32_nt_xent_close_to_float64_reference() -> None:
    z1, z2 = randn(300, 128, seed=5), randn(300, 128, seed=6)
    ids = torch.arange(300).repeat(2)
    ref = info_nce_reference(torch.cat([z1, z2]), ids, 0.2)
    ref_grads = torch.autograd.grad(ref, [z1, z2])
    a, b = (z.detach().float().requires_grad_() for z in (z1, z2))
    loss = nt_xent(a, b, 0.2)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    for g, e in zip(torch.autograd.grad(loss, [a, b]), ref_grads, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-8)


def test_no_grad_and_partial_grad_give_the_same_value(small_blocks: None) -> None:
    q, k = randn(9, 4, seed=7), randn(37, 4, seed=8)
    w, cols = torch.ones(9, dtype=torch.float64), torch.arange(9)
    full = weighted_lse(q, k, w, cols)
    with torch.no_grad():
        torch.testing.assert_close(weighted_lse(q, k, w, cols), full.detach())
    (gq,) = torch.autograd.grad(weighted_lse(q, k.detach(), w, cols), q)
    torch.testing.assert_close(gq, torch.autograd.grad(full, q)[0])


class _LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch function returns while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("loss_fn", [info_nce, info_nce_reference])
def test_memory_is_linear_no_n_by_n_tensor(small_blocks: None, loss_fn) -> None:  # type: ignore[no-untyped-def]
    n = 400
    z, ids = randn(n, 8, seed=9), torch.arange(n // 2).repeat(2)
    with _LargestTensor() as seen:
        loss_fn(z, ids, 0.5).backward()
    # the fast path holds one block (111 elements here) and N×D tensors; the reference N×N
    assert (seen.numel <= n * 8) == (loss_fn is info_nce), seen.numel


def test_double_backward_raises_instead_of_dropping_the_second_derivative() -> None:
    """The saved gradients carry no graph: a gradient penalty through them would silently lose
    the chunked term's second derivative (here only normalize's would remain), so it must raise."""
    z = randn(8, 4, seed=5)
    ids = torch.arange(4).repeat(2)
    (grad,) = torch.autograd.grad(info_nce(z, ids, 0.5, True), z, create_graph=True)
    (expected,) = torch.autograd.grad(info_nce_reference(z, ids, 0.5, True), z)
    torch.testing.assert_close(grad.detach(), expected, rtol=1e-10, atol=1e-12)  # first order: ok
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(grad.square().sum(), z)
    q, k = randn(5, 3, seed=6), randn(7, 3, seed=7)
    out = weighted_lse(q, k, torch.ones(5, dtype=torch.float64), torch.arange(5))
    grad_q, _ = torch.autograd.grad(out, [q, k], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(grad_q.sum(), k)  # the Hessian's q-k block
