"""--accumulate K: gradient caching makes K micro-batches of in-batch-negative methods exactly one
batch (against the plain loss of the whole batch, autograd, float64); the other methods average
their micro-batches' gradients; momentum, schedule, step counter and resume count optimiser
steps."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

from selfsup.engine.accumulate import cached_backward
from selfsup.engine.ema import cosine_momentum
from selfsup.image.config import PretrainConfig
from selfsup.image.data.captions import load_captions
from selfsup.image.losses import nt_xent
from selfsup.image.losses.clip import clip_loss
from selfsup.image.methods import get_method
from selfsup.image.methods.base import Method
from selfsup.image.methods.clip import CLIP, Options
from selfsup.image.train import pretrain

INFO = {
    "dataset": {"channels": 1, "image_size": [8, 8], "num_classes": 10},
    "encoder": {
        "backbone": "convnet",
        "in_channels": 1,
        "small_images": True,
        "mean": [0.3],
        "std": [0.3],
    },
}
SMALL = dict(projection_hidden=32, projection_dim=16)
MICRO, K = 4, 4  # one batch of 16


def images(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n) % 10


def without_batchnorm(module: nn.Module) -> nn.Module:
    """BatchNorm couples a batch's images; without it, K micro-batches can equal one batch."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            without_batchnorm(child)
    return module


class FirstGradients(Callback):
    """The gradients at the first optimiser step, and how many steps there were."""

    def __init__(self) -> None:
        self.grads: dict[str, Tensor] | None = None
        self.steps = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, module: Any, optimizer: Any) -> None:
        self.steps += 1
        if self.grads is None:
            self.grads = {
                n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None
            }


def fit(method: Method, batches: list[tuple[Tensor, Tensor]]) -> tuple[L.Trainer, FirstGradients]:
    seen = FirstGradients()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="64-true",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[seen],
    )
    trainer.fit(method, DataLoader(batches, batch_size=None))
    return trainer, seen


def reference_gradients(model: nn.Module, loss: Tensor) -> dict[str, Tensor]:
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same(ours: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert ours.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-6, atol=1e-9, msg=name)


def probe_loss(model: Method, features: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model.probe(features.detach()), y)  # type: ignore[misc]


@pytest.mark.parametrize("batchnorm", [False, True])
def test_simclr_accumulated_is_one_batch_of_16(batchnorm: bool) -> None:
    """Without BatchNorm: the plain loss of the whole batch. With it: the same, each
    micro-batch normalised by its own statistics, running statistics moved once per
    micro-batch (as K processes without SyncBatchNorm)."""
    config = PretrainConfig(method="simclr", batch_size=MICRO, accumulate=K)
    method = get_method("simclr")(config, INFO, get_method("simclr").Options(**SMALL))
    if not batchnorm:
        without_batchnorm(method)
    reference = copy.deepcopy(method).double()
    x, y = images(MICRO * K)
    _, seen = fit(method, [(x, y)])

    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            g = reference.step_generator()
            v1, v2 = reference.views(x, g), reference.views(x, g)  # one draw for the batch
        finally:
            torch.set_default_dtype(torch.float32)
    parts = (
        [(v1[i : i + MICRO], v2[i : i + MICRO]) for i in range(0, len(x), MICRO)]
        if batchnorm
        else [(v1, v2)]
    )
    z1, z2, features = [], [], []
    for a, b in parts:
        f = reference.encoder(torch.cat([a, b]))
        z = reference.projection(f)
        z1.append(z[: len(a)]), z2.append(z[len(a) :]), features.append(f[: len(a)])
    loss = nt_xent(torch.cat(z1), torch.cat(z2), 0.5)
    expected = reference_gradients(reference, loss + probe_loss(reference, torch.cat(features), y))
    assert seen.grads is not None
    assert_same(seen.grads, expected)
    if batchnorm:
        for (name, ours), theirs in zip(method.named_buffers(), reference.buffers(), strict=True):
            if "running" in name:
                torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9, msg=name)


def test_clip_accumulated_is_one_batch_of_16() -> None:
    """Images, captions drawn once, the learnable temperature's gradient included."""
    captions, _ = load_captions("digits", templates="a {}|the digit {}|a photo of {}", limit=64)
    options = Options(text_width=16, text_layers=1, text_heads=2, projection_dim=8)
    config = PretrainConfig(method="clip", batch_size=MICRO, accumulate=K)
    method = without_batchnorm(CLIP(config, INFO, options, captions=captions))
    reference = copy.deepcopy(method).double()
    x, y = images(MICRO * K)
    _, seen = fit(method, [(x, y)])

    torch.set_default_dtype(torch.float64)
    try:
        g = reference.step_generator()
        counts = reference.caption_counts[y]
        pick = (torch.rand(len(y), generator=g) * counts).long()
        views = reference.views(x, g)
    finally:
        torch.set_default_dtype(torch.float32)
    ids = reference.caption_ids[y, pick]
    ids = ids[:, : int((ids != reference.tokenizer.pad_token_id).sum(1).max())]
    features = reference.encoder(views)
    towers = reference.towers
    image = towers.image_projection(features)
    text = towers.text_projection(towers.text(ids))
    loss = clip_loss(image, text, towers.logit_scale()) + probe_loss(reference, features, y)
    expected = reference_gradients(reference, loss)
    assert seen.grads is not None and "towers.logit_scale.log_scale" in seen.grads
    assert_same(seen.grads, expected)


@pytest.mark.parametrize("name", ["byol", "moco"])
def test_ordinary_accumulation_averages_micro_batches_and_steps_momentum_once(name: str) -> None:
    """BYOL: the mean of the micro-batches' gradients, each its own BatchNorm batch. MoCo v2:
    the same with the queue held still until the optimiser step (so K micro-batches see the
    negatives one batch would). One momentum update, one schedule step per optimiser step."""
    cls = get_method(name)
    config = PretrainConfig(method=name, batch_size=MICRO, accumulate=K)
    method = cls(config, INFO, cls.Options(**SMALL))
    reference = copy.deepcopy(method).double().train()
    taus: list[float] = []
    update = method.update_targets
    method.update_targets = lambda tau: (taus.append(tau), update(tau))[1]  # type: ignore[method-assign]
    batches = [images(MICRO * K, seed) for seed in range(2)]
    trainer, seen = fit(method, batches)

    x, y = batches[0]
    total = torch.zeros((), dtype=torch.float64)
    torch.set_default_dtype(torch.float64)
    try:
        g = reference.step_generator()
        for xk, yk in zip(x.split(MICRO), y.split(MICRO), strict=True):
            loss, features = reference.pretext_loss(xk, yk, g)
            total = total + (loss + probe_loss(reference, features, yk)) / K
    finally:
        torch.set_default_dtype(torch.float32)
    assert seen.grads is not None
    assert_same(seen.grads, reference_gradients(reference, total))
    assert trainer.global_step == seen.steps == 2
    assert taus == pytest.approx(
        [cosine_momentum(s, 2, method.options.momentum) for s in (1, 2)]
    )  # after the step
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2
    if name == "moco":
        assert int(method.queue_ptr) == 2 * 2 * MICRO * K  # two views, two steps


def test_dino_centre_moves_once_per_optimiser_step_over_the_whole_batch() -> None:
    """centre <- m·centre + (1 - m)·mean of the teacher's outputs over all K micro-batches (not
    K moves, one per micro-batch)."""
    config = PretrainConfig(method="dino", batch_size=MICRO, accumulate=K)
    method = get_method("dino")(
        config, INFO, get_method("dino").Options(out_dim=32, projection_hidden=32, bottleneck=8)
    )
    outputs: list[Tensor] = []
    targets = method.targets
    method.targets = lambda v: (t := targets(v), outputs.append(t.detach().clone()))[0]  # type: ignore[method-assign]
    moves: list[int] = []
    update = method.update_center
    method.update_center = lambda t: (moves.append(len(t)), update(t))[1]  # type: ignore[method-assign]
    fit(method, [images(MICRO * K)])
    assert moves == [2 * MICRO * K] and len(outputs) == K  # one move, both views of 16 images
    m = method.options.center_momentum
    expected = (1 - m) * torch.cat(outputs).double().mean(0)
    torch.testing.assert_close(method.center.double(), expected, rtol=1e-6, atol=1e-9)


def test_nnclr_micro_batches_share_the_support_set_of_their_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every micro-batch of a step looks up the queue as it was before the step; after it, view
    1's projections of the whole batch go in, in the batch's order."""
    from selfsup.image.methods import nnclr

    config = PretrainConfig(method="nnclr", batch_size=MICRO, accumulate=K)
    method = nnclr.NNCLR(config, INFO, nnclr.Options(queue_size=64, **SMALL))
    initial = method.queue.clone().double()  # the step runs in float64
    seen: list[tuple[Tensor, Tensor]] = []  # (the queue looked up, view 1's projections)
    loss = nnclr.nnclr_loss

    def spy(z1: Tensor, z2: Tensor, p1: Tensor, p2: Tensor, queue: Tensor, t: float) -> Tensor:
        seen.append((queue.clone(), z1.detach().clone()))
        return loss(z1, z2, p1, p2, queue, t)

    monkeypatch.setattr(nnclr, "nnclr_loss", spy)
    fit(method, [images(MICRO * K)])
    assert len(seen) == K and all(torch.equal(q, initial) for q, _ in seen)
    z1 = F.normalize(torch.cat([z for _, z in seen]), dim=1)
    torch.testing.assert_close(method.queue[: MICRO * K], z1)
    torch.testing.assert_close(method.queue[MICRO * K :], initial[MICRO * K :])
    assert int(method.queue_ptr) == MICRO * K


def test_cached_backward_replays_dropout_and_keeps_running_stats() -> None:
    """The graph pass draws the graph-free pass's dropout masks; BatchNorm's running
    statistics move once per micro-batch."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Dropout(0.5), nn.Linear(7, 3)
    ).double()
    x = torch.randn(12, 5, dtype=torch.float64)
    chunks = [(c,) for c in x.split(4)]
    reference = copy.deepcopy(net)

    def loss_fn(z: Tensor) -> Tensor:
        return (z.softmax(0) * z).sum()

    torch.manual_seed(1)
    loss, (out,) = cached_backward(net, lambda c: (net(c),), loss_fn, chunks, Tensor.backward)
    torch.manual_seed(1)
    expected = loss_fn(torch.cat([reference(c) for (c,) in chunks]))
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    for a, b in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(net[1].running_mean, reference[1].running_mean)
    assert int(net[1].num_batches_tracked) == 3


def test_resumed_accumulating_run_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    """Steps, the schedule and checkpoints count optimiser steps (4 per epoch of 128 images at
    2 micro-batches of 16)."""
    options = dict(method="simclr", data="digits", limit=128, batch_size=16, accumulate=2)
    straight = pretrain(out=str(tmp_path / "a"), epochs=2, progress=False, **options)
    halted = pretrain(out=str(tmp_path / "b"), epochs=1, progress=False, **options)
    pretrain(resume=str(halted), epochs=2, progress=False)
    a, b = load_file(straight / "encoder.safetensors"), load_file(halted / "encoder.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    state = torch.load(halted / "checkpoints/last.ckpt", weights_only=True)
    assert state["global_step"] == 8 and state["lr_schedulers"][0]["last_epoch"] == 8


# --accumulate on the language stages (posttrain.fit_stage): K micro-batches, weighed by their
# labelled tokens (sft) or rows (dpo), are one optimiser step on the whole batch.

LM = {"accelerator": "cpu", "progress": False, "report": False, "precision": "64-true"}


@pytest.fixture(scope="module")
def lm_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 without dropout, a character tokenizer with the chat markers, conversations
    whose answers differ in length (so a mean of micro-batch means is not the batch's token
    mean), and preference pairs."""
    import json

    from transformers import GPT2Config, GPT2LMHeadModel

    from selfsup.core.tokenizer import train_tokenizer
    from selfsup.lm.data.chat_data import add_chat_tokens

    root = tmp_path_factory.mktemp("accumulate-lm")
    tokenizer = train_tokenizer(["0123456789 abcdefghijklmnopqrstuvwxyz?."], kind="char")
    add_chat_tokens(tokenizer)  # dpo starts from a model that has them
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2,
                        n_positions=96, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    sft = [{"prompt": f"what is {i}?", "completion": "it is " + "ab" * (i % 7) + "."}
           for i in range(32)]  # fmt: skip
    pairs = [{"prompt": f"what is {i}?", "chosen": "it is " + "a" * (i % 5) + ".",
              "rejected": f"{i}" * (1 + i % 3)} for i in range(16)]  # fmt: skip
    for name, lines in (("sft.jsonl", sft), ("pairs.jsonl", pairs)):
        (root / name).write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root


@pytest.fixture
def step_grads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Tensor]]:
    """The gradients at every optimiser step of the stages run in the test (before clipping)."""
    from selfsup.lm.training import posttrain

    seen: list[dict[str, Tensor]] = []

    class Recording(posttrain.StageModule):
        def on_before_optimizer_step(self, optimizer: Any) -> None:
            seen.append(
                {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}
            )
            super().on_before_optimizer_step(optimizer)

    monkeypatch.setattr(posttrain, "StageModule", Recording)
    return seen


def lm_stage(stage: str, base: Path, data: str, out: Path, **options: Any) -> Path:
    import selfsup

    init = str(base / "base")
    values = dict(init=init, data=str(base / data), out=str(out), lr=1e-2, val_fraction=0.0)
    return selfsup.align(stage, **{**values, **LM, **options})  # type: ignore[return-value]


def assert_same_steps(ours: list[dict[str, Tensor]], expected: list[dict[str, Tensor]]) -> None:
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected, strict=True):
        assert_same(a, b)


def final_state(run: Path) -> dict[str, Any]:
    return torch.load(run / "checkpoints/last.ckpt", weights_only=True)


def test_sft_accumulated_is_one_batch_of_16(lm_base: Path, tmp_path: Path, step_grads) -> None:
    """32 conversations, batch 16: two optimiser steps of the whole batch's token mean, whether
    in one piece or in 4 micro-batches of unequal token counts; the steps counted are the
    optimiser's."""
    runs = []
    for k in (1, 4):
        runs.append(lm_stage("sft", lm_base, "sft.jsonl", tmp_path / f"k{k}", batch_size=16,
                             epochs=1, accumulate=k, max_length=48))  # fmt: skip
    whole, micro = step_grads[:2], step_grads[2:]
    assert_same_steps(micro, whole)
    a, b = (final_state(r) for r in runs)
    assert a["global_step"] == b["global_step"] == 2
    assert b["lr_schedulers"][0]["last_epoch"] == 2
    for name, weight in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], weight, rtol=1e-6, atol=1e-9, msg=name)


def test_dpo_accumulated_is_one_batch_of_16(lm_base: Path, tmp_path: Path, step_grads) -> None:
    """16 pairs, batch 16: the per-pair mean of the whole batch in 4 micro-batches of 4."""
    for k in (1, 4):
        lm_stage("dpo", lm_base, "pairs.jsonl", tmp_path / f"k{k}", batch_size=16, epochs=1,
                 accumulate=k, beta=0.5)  # fmt: skip
    assert len(step_grads) == 2
    assert_same_steps(step_grads[1:], step_grads[:1])


def test_resumed_accumulating_stage_ends_where_an_uninterrupted_one_does(
    lm_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints and the schedule count optimiser steps: 4 per epoch of 32 at batch 8, a run
    stopped in its second epoch resumes from step 4 and ends at step 8 where one run does."""
    import selfsup
    from selfsup.core.run import RunFolder

    options = dict(batch_size=8, accumulate=2, max_length=48, epochs=2)
    straight = lm_stage("sft", lm_base, "sft.jsonl", tmp_path / "a", **options)
    append = RunFolder.append_metrics

    def interrupted(folder: RunFolder, row: dict, *args: Any) -> None:
        if row.get("epoch") == 2:
            raise KeyboardInterrupt
        append(folder, row, *args)

    monkeypatch.setattr(RunFolder, "append_metrics", interrupted)
    with pytest.raises(BaseException):  # noqa: B017 - the interruption, however reported
        lm_stage("sft", lm_base, "sft.jsonl", tmp_path / "b", **options)
    halted = tmp_path / "b"
    assert final_state(halted)["global_step"] == 4
    monkeypatch.setattr(RunFolder, "append_metrics", append)
    selfsup.align("sft", resume=str(halted), report=False, progress=False)
    a, b = final_state(straight), final_state(halted)
    assert a["global_step"] == b["global_step"] == 8
    assert b["lr_schedulers"][0]["last_epoch"] == 8
    for name, weight in a["state_dict"].items():  # as near as a resume without accumulation
        torch.testing.assert_close(b["state_dict"][name], weight, rtol=1e-6, atol=1e-6, msg=name)


def test_accumulate_must_divide_the_batch(lm_base: Path, tmp_path: Path) -> None:
    from selfsup.core.errors import SelfsupError

    with pytest.raises(SelfsupError, match="--batch-size 10 is not divisible by --accumulate 4"):
        lm_stage("sft", lm_base, "sft.jsonl", tmp_path / "a", batch_size=10, accumulate=4)
    with pytest.raises(SelfsupError, match="--accumulate must be"):
        lm_stage("sft", lm_base, "sft.jsonl", tmp_path / "b", accumulate=0)
    with pytest.raises(SelfsupError, match="kto's reference point is the KL estimate"):
        lm_stage("kto", lm_base, "pairs.jsonl", tmp_path / "c", batch_size=4, accumulate=2)
    assert not any((tmp_path / run).exists() for run in "abc")


# --accumulate on the online stages (lm grpo, lm rlhf): the update of a minibatch of rollouts in
# K micro-batches is the update of the whole minibatch, under every loss's own normaliser.

ROLLOUT_TOKENS = 12


@pytest.fixture(scope="module")
def online_models(lm_base: Path) -> tuple[Any, nn.Module]:
    """lm_base's tokenizer and tiny GPT-2, in float64."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(lm_base / "base")
    return tokenizer, GPT2LMHeadModel.from_pretrained(lm_base / "base").double()


def count_reward(reward_model: nn.Module, r: Any) -> Tensor:
    """A stand-in for the reward model's scores: a quarter of the answer tokens divisible
    by 3."""
    return ((r.responses % 3 == 0) & r.response_mask.bool()).double().sum(1) / 4


@pytest.fixture
def uneven_rollouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stages' sampled answers cut to lengths 1..12 (so micro-batches hold unequal token
    counts: a mean of their token means is not the minibatch's); PPO's scores `count_reward`."""
    from selfsup.lm.alignment import grpo, ppo
    from selfsup.lm.alignment.rollout import sample

    def cut(*args: Any, **kwargs: Any) -> Any:
        r = sample(*args, **kwargs)
        n, t = r.response_mask.shape
        lengths = 1 + (torch.arange(n) * 5 + 3) % t
        keep = (torch.arange(t)[None] < lengths[:, None]).long()
        mask = torch.cat([r.attention_mask[:, : r.prompt_length], keep], 1)
        return dataclasses.replace(r, attention_mask=mask, response_mask=keep)

    monkeypatch.setattr(grpo, "sample", cut)
    monkeypatch.setattr(ppo, "sample", cut)
    monkeypatch.setattr(ppo, "reward_scores", count_reward)


def step_recorder(trainer: Any) -> list[list[Tensor]]:
    """The gradients at each optimiser step of `trainer` (after clipping: tests set it off)."""
    seen: list[list[Tensor]] = []

    def hook(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        seen.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"]])

    trainer.optimizer.optimizer.register_step_pre_hook(hook)
    return seen


def float64_fabric() -> Any:
    """One process; its "32-true" leaves a float64 model and its outputs as they are (where
    "64-true" would hand the outputs back in the default float32)."""
    return L.Fabric(accelerator="cpu", devices=1)


PROMPTS = [[{"role": "user", "content": f"what is {i}?"}] for i in range(4)]


def grpo_run(online_models: tuple[Any, nn.Module], accumulate: int, **options: Any) -> Any:
    """(grads per optimiser step, final weights, stats) of one GRPO iteration: 4 prompts x 4
    answers, float64, no clipping."""
    from selfsup.lm.alignment.grpo import GRPOTrainer
    from selfsup.lm.alignment.grpo import Options as GRPOOptions

    tokenizer, model = online_models
    config = GRPOOptions(
        policy="p", reward="r", prompts="q", out="o", group_size=4, prompts_per_iteration=4,
        lr=1e-2, beta=0.1, max_new_tokens=ROLLOUT_TOKENS, max_grad_norm=1e9,
        accumulate=accumulate, **options,
    )  # fmt: skip
    trainer = GRPOTrainer(copy.deepcopy(model), tokenizer, config, float64_fabric())
    grads = step_recorder(trainer)

    def score(r: Any, prompt_of: list[int]) -> Tensor:  # spread within every group
        return r.response_mask.sum(1).double() + (r.responses % 3 == 0).sum(1)

    stats = trainer.step(PROMPTS, list(range(4)), seed=5, score=score)
    return grads, dict(trainer.policy.named_parameters()), stats


def assert_same_updates(ours: Any, expected: Any) -> None:
    """Gradients at every optimiser step, the weights after them, the statistics logged."""
    (grads, weights, stats), (grads1, weights1, stats1) = ours, expected
    assert len(grads) == len(grads1)
    for step, step1 in zip(grads, grads1, strict=True):
        for a, b in zip(step, step1, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    for name, w in weights1.items():
        torch.testing.assert_close(weights[name], w, rtol=1e-6, atol=1e-9, msg=name)
    assert stats == pytest.approx(stats1, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    "loss_type, minibatch",
    [("grpo", 8), ("bnpo", 8), ("dr-grpo", 8), ("dapo", 8), ("bnpo", 16)],
)  # fmt: skip
def test_grpo_accumulated_is_one_minibatch(
    online_models, uneven_rollouts, loss_type: str, minibatch: int
) -> None:
    """16 answers, --minibatch 8 (two optimiser steps; 16: one, the sampling policy's
    log-probabilities from the training pass): 4 micro-batches give the gradients, weights
    and statistics of whole minibatches, and as many optimiser steps."""
    options = dict(loss_type=loss_type, minibatch=minibatch)
    whole = grpo_run(online_models, 1, **options)
    assert len(whole[0]) == 16 // minibatch
    assert_same_updates(grpo_run(online_models, 4, **options), whole)


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])
def test_grpo_micro_batches_normalised_alone_would_fail(
    online_models, uneven_rollouts, monkeypatch: pytest.MonkeyPatch, loss_type: str
) -> None:
    """The planted bug: every micro-batch's loss normalised as if it were the minibatch and
    averaged (bnpo: by its own tokens; dapo: by the minibatch's, then divided by K)."""
    from selfsup.lm.alignment import grpo

    whole = grpo_run(online_models, 1, loss_type=loss_type, minibatch=8)
    monkeypatch.setattr(grpo, "micro_weights", lambda _, masks: [1 / len(masks)] * len(masks))
    with pytest.raises(AssertionError):
        assert_same_updates(grpo_run(online_models, 4, loss_type=loss_type, minibatch=8), whole)


def ppo_run(
    online_models: tuple[Any, nn.Module], accumulate: int, seed: int = 5, **settings: Any
) -> Any:
    """(grads per optimiser step, final weights, stats) of one PPO iteration on 16 answers,
    --minibatch 8, 2 epochs, float64 (the value head too), no clipping."""
    from selfsup.lm.alignment.ppo import PPOSettings, PPOTrainer

    tokenizer, model = online_models
    values = dict(rollouts=16, minibatch=8, ppo_epochs=2, lr=1e-2, max_new_tokens=ROLLOUT_TOKENS)
    options = PPOSettings(**{**values, **settings}, max_grad_norm=1e9, accumulate=accumulate)
    trainer = PPOTrainer(
        copy.deepcopy(model), nn.Linear(1, 1), tokenizer, options, float64_fabric()
    )
    with torch.no_grad():  # a value head that is not 0: the value loss's gradient reaches the LM
        trainer.model.value_head.double().linear.weight.normal_(0, 0.3, generator=torch.Generator())
    grads = step_recorder(trainer)
    conversations = [[{"role": "user", "content": f"what is {i}?"}] for i in range(16)]
    stats = trainer.step(conversations, seed=seed)
    return grads, dict(trainer.model.named_parameters()), stats


@pytest.mark.parametrize("target_kl", [0.0, 1e-6])
def test_ppo_accumulated_is_one_minibatch(online_models, uneven_rollouts, target_kl) -> None:
    """4 optimiser steps (2 epochs of 2 minibatches; with --target-kl 1e-6 one: the second
    minibatch stops the iteration, unapplied) whether each minibatch is one piece or 4
    micro-batches:
    the same gradients (policy and value loss as token means of the whole minibatch,
    advantages whitened over the whole batch), weights, statistics and ppo/updates."""
    whole = ppo_run(online_models, 1, target_kl=target_kl)
    assert whole[2]["ppo/updates"] == len(whole[0]) == (1 if target_kl else 4)
    assert_same_updates(ppo_run(online_models, 4, target_kl=target_kl), whole)


def test_ppo_micro_batch_token_means_averaged_would_fail(
    online_models, uneven_rollouts, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selfsup.lm.alignment.ppo import PPOTrainer

    whole = ppo_run(online_models, 1)
    monkeypatch.setattr(PPOTrainer, "_token_weights", lambda _, m: [1 / len(m)] * len(m))
    with pytest.raises(AssertionError):
        assert_same_updates(ppo_run(online_models, 4), whole)


def held_for_backward(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any]) -> int:
    """The most bytes autograd keeps for one backward pass during `run()` (the tensors one
    graph saves, freed by its backward)."""
    held, peak = [0], [0]

    def pack(t: Tensor) -> Tensor:
        held[0] += t.nbytes
        peak[0] = max(peak[0], held[0])
        return t

    backward = L.Fabric.backward

    def freed(fabric: Any, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        backward(fabric, loss, *args, **kwargs)
        held[0] = 0

    monkeypatch.setattr(L.Fabric, "backward", freed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    monkeypatch.setattr(L.Fabric, "backward", backward)
    return peak[0]


def test_grpo_accumulated_holds_under_half_the_activations(
    online_models, uneven_rollouts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What autograd keeps for a backward pass, at its largest, with 4 micro-batches is well
    under half that of the whole minibatch of 16."""
    whole, micro = (
        held_for_backward(
            monkeypatch, lambda k=k: grpo_run(online_models, k, loss_type="bnpo", minibatch=16)
        )
        for k in (1, 4)
    )
    assert micro < 0.5 * whole


def test_online_accumulate_must_divide_the_minibatch(tmp_path: Path, capsys) -> None:
    """Refused in one line before any file is read or written."""
    from selfsup.cli.main import main

    files = [x for n in ("policy", "reward", "prompts") for x in (f"--{n}", str(tmp_path / n))]
    for stage in ("grpo", "rlhf"):
        out = ["--out", str(tmp_path / stage)]
        assert main(["lm", stage, *files, *out, "--minibatch", "6", "--accumulate", "4"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "--minibatch 6 is not divisible by --accumulate 4" in err
    assert not any(tmp_path.iterdir())
