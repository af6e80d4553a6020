"""KTO (Ethayarajh et al., 2024): the loss against the paper's formula in float64 (values and
gradients) and against TRL's KTOTrainer, planted bugs that those checks catch, the unpaired and
ranking data, and `selfsup lm kto` end to end on the tiny SFT model."""

from __future__ import annotations

import inspect
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from test_alignment import _gold_of_favourite, _gold_pairs
from test_rlhf import AutoTokenizerFrom, sft_run, task  # noqa: F401  (module fixtures)
from transformers import AutoModelForCausalLM

from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.lm.alignment import kto as kto_module
from selfsup.lm.alignment.kto import _row, _split, kto_loss, read_unpaired

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64

# Three desirable and two undesirable answers, interleaved as a KTO batch comes (unequal counts
# and weights: swapped weights show): (log π, log π_ref, desirable); and the five mismatched
# pairs' log-probabilities, their mean log-ratio positive or negative.
ANSWERS = [(-3.0, -3.5, True), (-4.0, -4.4, False), (-5.0, -4.5, True), (-2.0, -2.2, True),
           (-6.5, -6.0, False)]  # fmt: skip
KL_POSITIVE = ([-6.0, -4.0, -3.0, -5.0, -7.0], [-9.0, -6.0, -5.5, -8.0, -9.5])  # mean 2.6
KL_NEGATIVE = ([-6.0, -4.0, -3.0, -5.0, -7.0], [-5.0, -3.5, -3.0, -4.5, -6.0])  # mean -0.6
BETA, LAMBDA_D, LAMBDA_U = 0.3, 1.0, 1.7


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def by_hand(kl: tuple[list[float], list[float]]) -> tuple[float, float, list[float]]:
    """The paper's eq. (7)-(8), L = E[λ_y - v(x, y)]: v = λ_D σ(β(r - z0)) for a desirable y,
    λ_U σ(β(z0 - r)) for an undesirable one, r = log π/π_ref, z0 = max(0, mean KL log-ratio)
    (held fixed), averaged over all answers: (loss, z0, d loss / d log π(y) written out)."""
    z0 = max(0.0, sum(p - r for p, r in zip(*kl, strict=True)) / len(kl[0]))
    n = len(ANSWERS)
    loss, grads = 0.0, []
    for policy, ref, desirable in ANSWERS:
        lam, sign = (LAMBDA_D, 1) if desirable else (LAMBDA_U, -1)
        v = sigmoid(BETA * sign * (policy - ref - z0))
        loss += (lam - lam * v) / n
        grads.append(-sign * lam * BETA * v * (1 - v) / n)
    return loss, z0, grads


def tensors(kl) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]
    """(policy, reference, desirable, KL pairs' policy, KL pairs' reference) in float64."""
    policy, ref, good = zip(*ANSWERS, strict=True)
    return (torch.tensor(policy, dtype=F64, requires_grad=True), torch.tensor(ref, dtype=F64),
            torch.tensor(good), torch.tensor(kl[0], dtype=F64, requires_grad=True),
            torch.tensor(kl[1], dtype=F64))  # fmt: skip


def check_against_paper(loss_fn, kl) -> None:  # type: ignore[no-untyped-def]
    """Assert that `loss_fn` (kto_loss's signature) gives the paper's loss, z0, rewards and
    gradients, and no gradient into the mismatched pairs."""
    policy, ref, good, pkl, rkl = tensors(kl)
    loss, rewards, z0 = loss_fn(policy, ref, good, pkl - rkl, BETA, (LAMBDA_D, LAMBDA_U))
    loss.backward()
    want, want_z0, grads = by_hand(kl)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert z0.item() == pytest.approx(want_z0, abs=1e-12)
    assert rewards.tolist() == pytest.approx([BETA * (p - r) for p, r, _ in ANSWERS], rel=1e-12)
    assert policy.grad.tolist() == pytest.approx(grads, rel=1e-10)
    assert pkl.grad is None or not pkl.grad.any()  # z0 is a detached reference point
    assert not (rewards.requires_grad or z0.requires_grad)


@pytest.mark.parametrize("kl", [KL_POSITIVE, KL_NEGATIVE], ids=["kl>0", "kl<0 clamped"])
def test_kto_loss_is_the_papers_formula_in_float64(kl) -> None:
    check_against_paper(kto_loss, kl)


PLANTED = {
    "z0 not detached": (".clamp(min=0).detach()", ".clamp(min=0)"),
    "z0 not clamped": (".clamp(min=0).detach()", ".detach()"),
    "weights swapped": ("weights[0] * (1", "weights[1] * (1"),
    "undesirable sign flipped": ("beta * (z0 - r)", "beta * (r - z0)"),
    "mean of the two sides' means": (
        "losses.mean()",
        "(losses[desirable].mean() + losses[~desirable].mean()) / 2",
    ),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_the_formula_check_catches_planted_bugs(bug) -> None:
    old, new = PLANTED[bug]
    source = inspect.getsource(kto_loss)
    assert source.count(old) == 1
    if bug == "weights swapped":  # λ_U on the desirable side and λ_D on the other
        source = source.replace(new, "@").replace(old, new).replace("@", old)
    else:
        source = source.replace(old, new)
    namespace = dict(vars(kto_module))
    exec(source, namespace)  # noqa: S102  (the test's own mutation of the function)
    with pytest.raises(AssertionError):
        for kl in (KL_POSITIVE, KL_NEGATIVE):
            check_against_paper(namespace["kto_loss"], kl)


def test_kto_loss_of_one_side_and_of_nothing() -> None:
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    good = torch.tensor([True, True])
    loss, _, _ = kto_loss(t([-1.0, -2.0]), t([-1.5, -2.0]), good, t([0.2, 0.4]), 0.5)
    z0 = (0.2 + 0.4) / 2
    assert loss.item() == pytest.approx(sum(1 - sigmoid(0.5 * (r - z0)) for r in (0.5, 0)) / 2)
    with pytest.raises(SelfsupError, match="empty"):
        kto_loss(t([]), t([]), torch.tensor([], dtype=torch.bool), t([0.1]), 0.5)


class _FakeLM:
    """Stands in for the model in KTOTrainer._compute_loss: given sequence log-probabilities
    (one completion token each) for the matched and, for ids >= 1000, the KL sequences."""

    training = True

    def __init__(self, logps: torch.Tensor, kl_logps: torch.Tensor) -> None:
        self.logps, self.kl_logps = logps, kl_logps

    def __call__(self, input_ids, labels, **kwargs):  # type: ignore[no-untyped-def]
        logps = self.kl_logps if bool((input_ids >= 1000).all()) else self.logps
        zeros = torch.zeros(len(input_ids), 1, dtype=F64)
        return SimpleNamespace(log_probs=logps[:, None], entropy=zeros, mean_logits=zeros)


@pytest.mark.parametrize("kl", [KL_POSITIVE, KL_NEGATIVE], ids=["kl>0", "kl<0 clamped"])
def test_kto_loss_matches_trls(kl) -> None:
    trl = pytest.importorskip("trl")
    policy, ref, good, pkl, rkl = tensors(kl)
    model = _FakeLM(policy, pkl.detach())
    trainer = trl.KTOTrainer.__new__(trl.KTOTrainer)
    trainer.__dict__.update(
        model=model, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        _total_train_tokens=0, _tp_size=1, aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=True, loss_type="kto", beta=BETA, desirable_weight=LAMBDA_D,
        undesirable_weight=LAMBDA_U,
    )  # fmt: skip
    ids, ones = torch.arange(5)[:, None].repeat(1, 2), torch.ones(5, 2, dtype=torch.long)
    batch = dict(input_ids=ids, attention_mask=ones, completion_mask=ones,
                 KL_input_ids=ids + 1000, KL_attention_mask=ones, KL_completion_mask=ones,
                 label=good, ref_logps=ref, ref_KL_logps=rkl)  # fmt: skip
    theirs = trainer._compute_loss(model, batch, False)
    (their_grad,) = torch.autograd.grad(theirs, policy)
    loss, rewards, z0 = kto_loss(policy, ref, good, pkl - rkl, BETA, (LAMBDA_D, LAMBDA_U))
    (grad,) = torch.autograd.grad(loss, policy)
    metrics = trainer._metrics["train"]
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-12)
    assert z0.item() == pytest.approx(metrics["kl"][0], abs=1e-12)
    assert rewards[good].mean().item() == pytest.approx(metrics["rewards/chosen"][0])
    assert rewards[~good].mean().item() == pytest.approx(metrics["rewards/rejected"][0])
    assert grad.tolist() == pytest.approx(their_grad.tolist(), rel=1e-12)


def test_mismatched_rows_are_the_tokenized_conversations(sft_run) -> None:  # noqa: F811
    """A KL row, prompt i's tokens then answer j's, is what tokenizing that conversation gives;
    the answer alone is labelled, however many assistant turns came before."""
    from selfsup.lm.data.chat_data import IGNORE, sft_example

    tokenizer = AutoTokenizerFrom(sft_run)
    history = [{"role": "user", "content": "1 plus 1?"}, {"role": "assistant", "content": "2."}]
    first = [*history, {"role": "user", "content": "3 plus 4?"}]
    second = [{"role": "user", "content": "5 plus 6?"}]
    answer = {"role": "assistant", "content": "The answer is 11."}
    prompt, _ = _split(
        sft_example(tokenizer, [*first, {"role": "assistant", "content": "7."}], 999)
    )
    _, tail = _split(sft_example(tokenizer, [*second, answer], 999))
    ids, labels = _row(prompt, tail, 999)
    assert ids == sft_example(tokenizer, [*first, answer], 999)[0]
    assert [i for i, label in zip(ids, labels, strict=True) if label != IGNORE] == tail
    assert tokenizer.decode(tail) == "The answer is 11.<END>"
    assert _row(prompt, tail, 5) == (ids[-5:], labels[-5:])  # cut: the end stays


def _write(path, records) -> str:  # type: ignore[no-untyped-def]
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


def test_unpaired_records_text_and_conversational(tmp_path) -> None:
    path = _write(tmp_path / "u.jsonl", [
        {"prompt": "2 plus 3?", "completion": "5.", "label": True},
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "2 plus 3?"}],
         "completion": [{"role": "assistant", "content": "6."}], "label": False},
    ])  # fmt: skip
    (first, good), (second, bad) = read_unpaired(path)
    assert (good, bad) == (True, False)
    assert first.conversation(first.completions[0]) == [
        {"role": "user", "content": "2 plus 3?"}, {"role": "assistant", "content": "5."}
    ]  # fmt: skip
    assert second.history == ({"role": "system", "content": "Be brief."},)
    assert (second.prompt, second.completions, second.where) == ("2 plus 3?", ("6.",), f"{path}:2")
    assert read_unpaired(_write(tmp_path / "r.jsonl", [{"prompt": "x", "chosen": "a",
                                                         "rejected": "b"}])) is None  # fmt: skip


GOOD = {"prompt": "2 plus 3?", "completion": "5.", "label": True}
BAD_LINES = [
    ({**GOOD, "label": "yes"}, "'label' must be true or false, got \"yes\""),
    ({**GOOD, "label": 1}, "'label' must be true or false, got 1"),
    ({"prompt": "2 plus 3?", "completion": "5."}, "no 'label': every record"),
    ({**GOOD, "completion": ""}, "field 'completion' must be a non-empty string"),
    ({**GOOD, "prompt": [{"role": "user", "content": "x"}]}, "must both be strings or both lists"),
    ({**GOOD, "prompt": [{"role": "user", "content": "x"}], "completion": [
        {"role": "assistant", "content": "5."}, {"role": "assistant", "content": "6."}]},
     "'completion' must be one assistant message"),
    ({**GOOD, "prompt": [{"role": "assistant", "content": "x"}],
      "completion": [{"role": "assistant", "content": "5."}]}, "must end with the user's turn"),
    ({**GOOD, "prompt": [{"role": "robot", "content": "x"}],
      "completion": [{"role": "assistant", "content": "5."}]}, "messages[0] needs a role"),
    ("{not json", "not valid JSON"),
]  # fmt: skip


@pytest.mark.parametrize("record, message", BAD_LINES)
def test_a_bad_unpaired_line_is_one_line_naming_it(tmp_path, capsys, record, message) -> None:
    path = _write(tmp_path / "u.jsonl", [GOOD, {**GOOD, "label": False}, record])
    assert main(["lm", "kto", "--init", "x", "--data", path, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:3" in err and message in err, err
    assert not (tmp_path / "o").exists()


def test_kto_options_are_checked_before_anything_is_read(capsys) -> None:
    for flag, value, message in [
        ("--beta", "0", "--beta must be positive"),
        ("--desirable-weight", "-1", "--desirable-weight must be positive"),
        ("--undesirable-weight", "0", "--undesirable-weight must be positive"),
        ("--batch-size", "1", "--batch-size must be at least 2"),
    ]:
        assert main(["lm", "kto", "--init", "x", "--data", "y", "--out", "z", flag, value]) == 2
        assert message in capsys.readouterr().err


def _log_ratio_margin(run, sft, path) -> float:  # type: ignore[no-untyped-def]
    """Mean log π/π_SFT of the desirable answers minus that of the undesirable ones."""
    from selfsup.lm.alignment.dpo import pair_batch, sequence_logprobs
    from selfsup.lm.data.chat_data import sft_example

    tokenizer = AutoTokenizerFrom(sft)
    records = read_unpaired(path)
    rows = [sft_example(tokenizer, r.conversation(r.completions[0]), 64) for r, _ in records]
    good = torch.tensor([label for _, label in records])
    batch = pair_batch([(r, r) for r in rows], 0, "cpu")
    ratio = torch.zeros(len(rows))
    for folder, sign in ((run, 1), (sft, -1)):
        model = AutoModelForCausalLM.from_pretrained(folder / "hf").eval()
        with torch.no_grad():
            ratio += sign * sequence_logprobs(model, batch)[: len(rows)]
    return float(ratio[good].mean() - ratio[~good].mean())


def test_kto_learns_unpaired_answers(task, sft_run, capsys) -> None:  # noqa: F811
    """From rankings by the gold score, unpaired into TRL's format (the best answer of each
    prompt desirable, the worst undesirable): the loss falls below its start (1/2: the policy
    is the reference), most answers end on their label's side of z0, and the desirable
    answers' log-ratio to the SFT model rises above the undesirable ones'."""
    records = []
    for r in _gold_pairs(task / "kto-rankings.jsonl", 64, seed=11):
        order = ["ABCD".index(c) for c in r["ranking"].split(" > ")]
        for i, label in ((order[0], True), (order[-1], False)):
            records.append(
                {"prompt": r["prompt"], "completion": r["completions"][i], "label": label}
            )
    data = _write(task / "kto-unpaired.jsonl", records)
    out = task / "kto"
    assert main(["lm", "kto", "--init", str(sft_run), "--data", data, "--out", str(out),
                 "--epochs", "2", "--batch-size", "16", "--lr", "2e-3", "--beta", "0.3",
                 "--max-length", "64", "--val-fraction", "0.25",
                 "--accelerator", "cpu"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert f"{data}: 64 desirable and 64 undesirable answers" in lines
    assert lines[-2].startswith("val reward acc ") and lines[-1].startswith("next: selfsup")
    rows = (out / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert {"val_loss", "val_reward_acc", "val_kl"} <= set(header)
    assert float(last[header.index("val_loss")]) < 0.45
    assert float(last[header.index("val_reward_acc")]) > 0.7
    assert _log_ratio_margin(out, sft_run, data) > 1.0


def test_kto_from_rankings_raises_gold(task, sft_run, capsys) -> None:  # noqa: F811
    """From the rankings DPO reads (every strictly ordered pair's chosen answer desirable, its
    rejected one undesirable: 6 + 6 answers per ranking of four, TRL's unpairing), the gold of
    the answer the policy prefers among four rises on held-out prompts (as DPO's test)."""
    data = str(task / "kto-ranked.jsonl")
    _gold_pairs(task / "kto-ranked.jsonl", 64, seed=5)
    out = task / "kto-ranked"
    assert main(["lm", "kto", "--init", str(sft_run), "--data", data, "--out", str(out),
                 "--epochs", "2", "--lr", "1e-3", "--beta", "0.1", "--max-length", "64",
                 "--val-fraction", "0.25", "--accelerator", "cpu"]) == 0  # fmt: skip
    assert f"{data}: 384 desirable and 384 undesirable answers" in capsys.readouterr().out
    _gold_pairs(task / "held-out.jsonl", 48, seed=77)
    before = _gold_of_favourite(sft_run, task / "held-out.jsonl")
    after = _gold_of_favourite(out, task / "held-out.jsonl")
    print(f"gold of the favourite answer {before:.3f} -> {after:.3f}")
    assert after > before + 0.05
