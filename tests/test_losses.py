import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.image.losses import (
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


def test_contrastive_margin_squared_distance_form_by_hand_and_gradient():
    f_x = torch.zeros(2, 2)
    f_pos = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)  # d_pos² = 1, 4
    f_neg = torch.tensor([[0.5, 0.0], [3.0, 0.0]], requires_grad=True)  # d_neg² = 0.25, 9
    # row 0: hinge active, 1 + (1 - 0.25); row 1: hinge inactive, 4 + 0
    loss = contrastive_margin(f_x, f_pos, f_neg, margin=1.0, form="squared-distance")
    assert loss.item() == pytest.approx((1.75 + 4.0) / 2)
    loss.backward()
    # d/df_pos = 2 (f_pos - f_x) / B; d/df_neg = -2 (f_neg - f_x) / B on active rows only
    torch.testing.assert_close(f_pos.grad, torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(f_neg.grad, torch.tensor([[-0.5, 0.0], [0.0, 0.0]]))
    wrapped = ContrastiveMarginLoss(margin=10.0, form="squared-distance")(f_x, f_pos, f_neg)
    assert wrapped.item() == pytest.approx((1 + 9.75 + 4 + 1) / 2)


def _naive_hadsell(f_x, f_pos, f_neg, m):
    """Float64 loops: mean of d_pos² + max(0, m - d_neg)² and its gradient in f_neg."""
    loss, grad = 0.0, []
    for x, p, n in zip(f_x.tolist(), f_pos.tolist(), f_neg.tolist(), strict=True):
        d_pos_sq = sum((a - b) ** 2 for a, b in zip(x, p, strict=True))
        d_neg = math.sqrt(sum((a - b) ** 2 for a, b in zip(x, n, strict=True)))
        gap = max(0.0, m - d_neg)
        loss += (d_pos_sq + gap**2) / len(f_x)
        # ∂/∂n of (m - |x - n|)² = -2 gap (n - x) / |x - n| = 2 gap (x - n) / |x - n|
        row = [2 * gap * (a - b) / d_neg / len(f_x) for a, b in zip(x, n, strict=True)]
        grad.append(row if gap else [0.0] * len(x))
    return loss, torch.tensor(grad, dtype=torch.float64)


def test_contrastive_margin_hadsell_form_matches_the_paper():
    g = torch.Generator().manual_seed(0)
    f_x, f_pos = (
        torch.randn(64, 3, generator=g, dtype=torch.float64),
        torch.randn(64, 3, generator=g, dtype=torch.float64),
    )
    f_neg = (f_x + torch.randn(64, 3, generator=g, dtype=torch.float64)).requires_grad_()
    margin = 1.5  # a distance: about half the negatives lie inside it
    expected, expected_grad = _naive_hadsell(f_x, f_pos, f_neg, margin)
    assert 10 < int((expected_grad.abs().sum(1) > 0).sum()) < 54  # both sides of the hinge
    loss = contrastive_margin(f_x, f_pos, f_neg, margin)  # the paper's form is the default
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(f_neg.grad, expected_grad, rtol=1e-10, atol=1e-14)
    module = ContrastiveMarginLoss(margin, form="hadsell")(f_x, f_pos, f_neg)
    assert module.item() == pytest.approx(expected, rel=1e-12)
    # one hand case where the forms differ: d_neg = 1.5 inside m = 2, but d_neg² = 2.25 is not
    one = torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.5, 0.0]])
    assert contrastive_margin(*one, margin=2.0).item() == pytest.approx(0.25)
    assert contrastive_margin(*one, margin=2.0, form="squared-distance").item() == 0.0


def test_contrastive_margin_hadsell_gradient_is_finite_at_zero_distance():
    f_x = torch.ones(2, 3, requires_grad=True)
    loss = contrastive_margin(f_x, torch.zeros(2, 3), torch.ones(2, 3), margin=1.0)
    assert loss.item() == pytest.approx(3 + 1)  # d_pos² = 3, (1 - 0)² = 1
    loss.backward()
    assert torch.isfinite(f_x.grad).all()
    with pytest.raises(ValueError, match="form must be one of hadsell, squared-distance"):
        contrastive_margin(f_x, f_x, f_x, form="hinge")


def test_modules_match_functions_and_reject_bad_temperature():
    z, ids = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(InfoNCELoss(0.2)(z, ids), info_nce(z, ids, 0.2))
    for bad in (0.0, -0.5):
        for make in (InfoNCELoss, NTXentLoss):
            with pytest.raises(ValueError, match="temperature"):
                make(bad)
        with pytest.raises(ValueError, match="temperature"):
            info_nce(z, ids, bad)
