"""Checkpoints of earlier versions still load: every image method builds the same state_dict
(names, shapes, order) and hands the optimiser its parameters in the same order as the code that
wrote tests/method_state_keys.json (recorded before the momentum/two-view refactor of issue 30)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfsup.image.methods import get_method

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDED = json.loads((Path(__file__).parent / "method_state_keys.json").read_text())
INFO = {
    "dataset": {"channels": 3, "image_size": [16, 16], "num_classes": 3},
    "encoder": {"backbone": "convnet", "in_channels": 3, "small_images": True,
                "mean": [0.5] * 3, "std": [0.3] * 3},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_state_dict_keys_and_parameter_order_are_those_of_earlier_versions(
    name: str, tmp_path: Path
) -> None:
    method = name.split("+")[0]  # "dino+local": DINO with multi-crop
    extra = {"local_crops": 2, "local_size": 8, "recipe": "simclr"} if "+" in name else {}
    if method == "distill":  # its frozen teacher is in no state_dict
        from test_distill import hf_teacher

        extra = {"teacher": str(hf_teacher(tmp_path))}
    model = get_method(method).create(INFO, method=method, **extra)
    keys = [f"{k} {'x'.join(map(str, v.shape)) or 'scalar'}" for k, v in model.state_dict().items()]
    assert keys == RECORDED[name]["state_dict"]
    trainable = [  # the optimiser's order (configure_optimizers): its state is stored by place
        n
        for child, module in model.named_children()
        if child != "probe"
        for n, p in module.named_parameters(prefix=child)
        if p.requires_grad
    ]
    assert trainable == RECORDED[name]["trainable"]


@pytest.mark.parametrize("name", ["byol", "moco", "moco-v3", "dino"])
def test_momentum_targets_are_frozen_copies_that_move_by_ema(name: str) -> None:
    torch.manual_seed(0)
    model = get_method(name).create(INFO, method=name)
    assert model.momentum_targets and model.options.momentum == 0.99
    for target, online in model.momentum_targets:
        t, o = getattr(model, target), getattr(model, online)
        assert not any(p.requires_grad for p in t.parameters())
        assert all(p.requires_grad for p in o.parameters())
        for a, b in zip(t.state_dict().values(), o.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for _, online in model.momentum_targets:
            for p in getattr(model, online).parameters():
                p.add_(1.0)
    model.update_targets(0.9)  # target <- 0.9 target + 0.1 (target + 1) = target + 0.1
    for target, _ in model.momentum_targets:
        for k, p in getattr(model, target).named_parameters(prefix=target):
            torch.testing.assert_close(p, before[k] + 0.1)


def test_dino_multi_crop_builds_from_create_with_its_default_recipe() -> None:
    from selfsup.image.augment.recipes import RECIPES

    model = get_method("dino").create(INFO, method="dino", local_crops=2, local_size=8)
    assert model.config.recipe == "simclr"
    assert model.local_views.steps[0][1]["size"] == (8, 8)
    others = [s for s in RECIPES["simclr"]((16, 16), 3) if s[0] != "crop"]
    assert model.views.steps[1:] == others
