"""Optimizers and the learning-rate schedule against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from selfsup.core.errors import SelfsupError
from selfsup.engine.optim import LARS, build_optimizer, parameter_groups, warmup_cosine


def test_warmup_then_cosine() -> None:
    f = warmup_cosine(warmup_steps=4, total_steps=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.0)
    assert f(100) == pytest.approx(0.0)


def test_weight_decay_skips_biases_and_norm_layers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = parameter_groups([model], weight_decay=0.1)
    assert {p.ndim for p in decay["params"]} == {4, 2}
    assert len(no_decay["params"]) == 4  # conv bias, BN weight and bias, linear bias
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"]


def test_a_parameter_reached_through_two_modules_is_stepped_once() -> None:
    """MAE's ViT is also its encoder's backbone: listed twice, AdamW would step it twice. The
    first AdamW step moves each weight by lr * sign(grad) (m / sqrt(v) = g / |g|)."""
    shared = nn.Linear(3, 2, bias=False)
    model = nn.ModuleDict({"vit": shared, "encoder": nn.Sequential(shared)})
    before = shared.weight.detach().clone()
    groups = parameter_groups(list(model.children()), weight_decay=0.0)
    assert sum(len(g["params"]) for g in groups) == 1
    optimizer = build_optimizer("adamw", groups, lr=0.01)
    shared(torch.randn(4, 3)).square().sum().backward()
    grad = shared.weight.grad.clone()
    optimizer.step()
    torch.testing.assert_close(
        shared.weight.detach(), before - 0.01 * grad.sign(), atol=1e-6, rtol=0
    )


def test_lars_step_matches_hand_computation() -> None:
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS(
        [
            {"params": [w], "weight_decay": 0.5},
            {"params": [b], "weight_decay": 0.0, "lars_exclude": True},
        ],
        lr=0.1,
    )
    w.grad = torch.tensor([0.0, 1.0])
    b.grad = torch.tensor([2.0])
    opt.step()
    g = torch.tensor([0.0, 1.0]) + 0.5 * torch.tensor([3.0, 4.0])  # gradient + weight decay
    trust = 0.001 * 5.0 / g.norm()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * trust * g)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))


def test_unknown_optimizer_is_one_line() -> None:
    with pytest.raises(SelfsupError, match="--optimizer 'rmsprop' is unknown"):
        build_optimizer("rmsprop", [{"params": [nn.Parameter(torch.zeros(1))]}], lr=0.1)
