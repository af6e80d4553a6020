import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses import (
    ContrastiveMarginLoss,
    InfoNCELoss,
    NTXentLoss,
    contrastive_margin,
    info_nce,
    nt_xent,
)


def naive_info_nce(z, ids, t, normalize=True):
    """Per-anchor loop straight from the SupCon L_out formula."""
    if normalize:
        z = z / z.norm(dim=1, keepdim=True)
    n, losses = len(z), []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        positives = [j for j in others if ids[j] == ids[i]]
        if not positives:
            continue
        log_denom = torch.logsumexp(torch.stack([z[i] @ z[j] / t for j in others]), dim=0)
        losses.append(-torch.stack([z[i] @ z[p] / t - log_denom for p in positives]).mean())
    return torch.stack(losses).mean()


ID_PATTERNS = {
    "simclr": torch.arange(5).repeat(2),
    "multiview": torch.arange(3).repeat(4),
    "supcon": torch.tensor([0, 1, 2, 1, 0, 0, 2, 1, 1, 0, 2]),
    "some_unique": torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4]),
}


@pytest.mark.parametrize("pattern", list(ID_PATTERNS))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_info_nce_matches_naive_reference_values_and_grads(pattern, normalize, t):
    ids = ID_PATTERNS[pattern]
    g = torch.Generator().manual_seed(len(ids))
    z = torch.randn(len(ids), 6, generator=g, dtype=torch.float64, requires_grad=True)
    loss = info_nce(z, ids, t, normalize)
    ref = naive_info_nce(z, ids, t, normalize)
    (grad,) = torch.autograd.grad(loss, z)
    (ref_grad,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-10)


def test_info_nce_hand_computed():
    # Unit vectors a=(1,0), b=(0,1) (view 1) and a'=(.6,.8), b'=(.8,.6) (view 2); τ = 0.5.
    # Cosines: aa'=.6 ab=0 ab'=.8, ba'=.8 bb'=.6, a'b'=.96; logits are cosines / 0.5.
    # Anchors a and b: -(1.2 - log(e^0 + e^1.2 + e^1.6)); anchors a', b': -(1.2 - log(e^1.2 +
    # e^1.6 + e^1.92)).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]], dtype=torch.float64)
    first = math.log(1 + math.exp(1.2) + math.exp(1.6)) - 1.2
    second = math.log(math.exp(1.2) + math.exp(1.6) + math.exp(1.92)) - 1.2
    expected = (first + second) / 2
    ids = torch.tensor([0, 1, 0, 1])
    assert info_nce(z, ids, 0.5).item() == pytest.approx(expected, rel=1e-12)
    assert nt_xent(z[:2], z[2:], 0.5).item() == pytest.approx(expected, rel=1e-12)
    # Rescaling rows does not matter with normalize=True, but does without.
    scaled = z * torch.tensor([[3.0], [0.5], [2.0], [7.0]], dtype=torch.float64)
    assert info_nce(scaled, ids, 0.5).item() == pytest.approx(expected, rel=1e-12)
    assert info_nce(scaled, ids, 0.5, normalize=False).item() != pytest.approx(expected, rel=1e-3)


def test_nt_xent_equals_classic_cross_entropy_form():
    g = torch.Generator().manual_seed(0)
    b, t = 16, 0.2
    z1, z2 = torch.randn(b, 32, generator=g), torch.randn(b, 32, generator=g)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / t).fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(b) + b, torch.arange(b)])
    expected = F.cross_entropy(logits, targets)
    torch.testing.assert_close(nt_xent(z1, z2, t), expected)
    torch.testing.assert_close(NTXentLoss(t)(z1, z2), expected)


def test_info_nce_stable_at_low_temperature_with_large_inputs():
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(64, 16, generator=g) * 1e4).requires_grad_()
    ids = torch.arange(32).repeat(2)
    loss = info_nce(z, ids, temperature=0.01)  # exp(1/0.01) overflows float32
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    ref = naive_info_nce(z.detach().double(), ids, 0.01)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)
    unnormalized = info_nce(z.detach() * 1e-3, ids, temperature=0.01, normalize=False)
    assert torch.isfinite(unnormalized)


def test_anchors_without_positives_only_count_as_negatives():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 1, 7])  # sample 4 has no positive
    zn = F.normalize(z, dim=1)
    s = zn @ zn.T / 0.5
    per_anchor = [
        -(s[i, p] - torch.logsumexp(s[i, [j for j in range(5) if j != i]], 0))
        for i, p in [(0, 1), (1, 0), (2, 3), (3, 2)]
    ]
    assert info_nce(z, ids).item() == pytest.approx(torch.stack(per_anchor).mean().item())
    assert info_nce(z, ids).item() != pytest.approx(info_nce(z[:4], ids[:4]).item())


def test_no_positives_gives_zero_connected_to_graph():
    z = torch.randn(4, 3, requires_grad=True)
    loss = info_nce(z, torch.arange(4))
    loss.backward()
    assert loss.item() == 0 and torch.equal(z.grad, torch.zeros_like(z))


def test_info_nce_invariant_to_scaling_when_normalized():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(12, 8, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 4])
    scale = torch.rand(12, 1, generator=g, dtype=torch.float64) * 100 + 0.01
    torch.testing.assert_close(info_nce(z * scale, ids, 0.3), info_nce(z, ids, 0.3))


def test_low_precision_inputs_are_computed_in_float32():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(32, 16, generator=g)
    ids = torch.arange(16).repeat(2)
    loss = info_nce(z.bfloat16(), ids, 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(info_nce(z.bfloat16().float(), ids, 0.1).item(), rel=1e-6)


def test_contrastive_margin_by_hand_and_gradient():
    f_x = torch.zeros(2, 2)
    f_pos = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)  # d_pos = 1, 4
    f_neg = torch.tensor([[0.5, 0.0], [3.0, 0.0]], requires_grad=True)  # d_neg = 0.25, 9
    # row 0: hinge active, 1 + (1 - 0.25); row 1: hinge inactive, 4 + 0
    loss = contrastive_margin(f_x, f_pos, f_neg, margin=1.0)
    assert loss.item() == pytest.approx((1.75 + 4.0) / 2)
    loss.backward()
    # d/df_pos = 2 (f_pos - f_x) / B; d/df_neg = -2 (f_neg - f_x) / B on active rows only
    torch.testing.assert_close(f_pos.grad, torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(f_neg.grad, torch.tensor([[-0.5, 0.0], [0.0, 0.0]]))
    wrapped = ContrastiveMarginLoss(margin=10.0)(f_x, f_pos, f_neg)  # both hinges active
    assert wrapped.item() == pytest.approx((1 + 9.75 + 4 + 1) / 2)


def test_modules_match_functions_and_reject_bad_temperature():
    z, ids = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(InfoNCELoss(0.2)(z, ids), info_nce(z, ids, 0.2))
    for bad in (0.0, -0.5):
        for make in (InfoNCELoss, NTXentLoss):
            with pytest.raises(ValueError, match="temperature"):
                make(bad)
        with pytest.raises(ValueError, match="temperature"):
            info_nce(z, ids, bad)
