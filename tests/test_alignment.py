"""DPO and GRPO: their losses against float64 formulas (and TRL's where installed), pair
extraction by hand, and short runs on the arithmetic task that beat the SFT model they start
from."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from test_rlhf import ALPHABET, AutoTokenizerFrom, sft_run, task  # noqa: F401  (module fixtures)
from transformers import AutoModelForCausalLM

from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.lm.data.arithmetic import demonstration, gold_score, problems
from selfsup.lm.data.conversations import read_rankings
from selfsup.lm.losses.preference import dpo_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _logps(seed: int, n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-20 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4)]


def test_dpo_loss_is_the_formula_in_float64():
    pc, pr, rc, rr = _logps(0)
    beta = 0.3
    loss, chosen, rejected = dpo_loss(pc.float(), pr.float(), rc.float(), rr.float(), beta)
    by_hand = np.mean(
        [
            -math.log(1 / (1 + math.exp(-beta * ((a - c) - (b - d)))))
            for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True)
        ]
    )
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    torch.testing.assert_close(chosen.double(), beta * (pc - rc), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rejected.double(), beta * (pr - rr), rtol=1e-5, atol=1e-5)
    # the gradient pushes the chosen answer up and the rejected one down
    pc_, pr_ = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    dpo_loss(pc_, pr_, rc, rr, beta)[0].backward()
    assert (pc_.grad < 0).all() and (pr_.grad > 0).all()


def test_dpo_loss_matches_trls():
    trl = pytest.importorskip("trl")
    from types import SimpleNamespace

    from trl.trainer.dpo_trainer import DPOTrainer

    pc, pr, rc, rr = (x.float() for x in _logps(1, 4))
    beta = 0.2
    # TRL computes its loss inside the trainer from the model's per-token log-probs; hand it a
    # model whose chosen and rejected rows carry our summed log-probs on one completion token.
    n = len(pc)
    per_token = torch.zeros(2 * n, 3)
    per_token[:, 1] = torch.cat([pc, pr])
    completion_mask = torch.zeros(2 * n, 4, dtype=torch.long)
    completion_mask[:, 2] = 1

    def outputs(log_probs):
        return SimpleNamespace(
            log_probs=log_probs, entropy=torch.zeros(2 * n, 3),
            mean_logits=torch.zeros(2 * n, 3), is_top1=torch.zeros(2 * n, 3, dtype=torch.bool),
            aux_loss=None,
        )  # fmt: skip

    model = SimpleNamespace(training=False)
    policy = lambda **kw: outputs(per_token)  # noqa: E731
    fake = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(
            device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=beta,
        use_weighting=False, label_smoothing=0.0, args=SimpleNamespace(
            gradient_checkpointing_kwargs=None), _metrics=_Metrics(), _total_train_tokens=0,
        _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(2 * n, 4, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, 4, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    try:
        theirs = DPOTrainer._compute_loss(fake, policy, inputs, return_outputs=False)
    except (AttributeError, TypeError, KeyError) as e:  # another TRL version's internals
        pytest.skip(f"trl {trl.__version__}: its DPO loss is not reachable this way ({e})")
    ours, _, _ = dpo_loss(pc, pr, rc, rr, beta)
    assert float(theirs) == pytest.approx(ours.item(), rel=1e-5)


class _Metrics(dict):
    def __missing__(self, key):
        self[key] = value = _Lists()
        return value


class _Lists(dict):
    def __missing__(self, key):
        self[key] = value = []
        return value


def test_pairs_from_a_ranking_and_trls_formats(tmp_path):
    from selfsup.lm.alignment.dpo import preference_pairs

    records = [
        {"prompt": "1 plus 1?", "completions": ["2.", "3.", "The answer is 2.", "2"],
         "ranking": "D > C > A = B"},
        {"prompt": "2 plus 2?", "completions": ["4.", "4."], "ranking": "A = B"},  # no pair
        {"prompt": "3 plus 3?", "completions": ["6.", "6.", "7."], "ranking": "A > B > C"},
        {"prompt": "4 plus 4?", "chosen": "8.", "rejected": "9."},
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "5 plus 5?"}],
         "chosen": [{"role": "assistant", "content": "10."}],
         "rejected": [{"role": "assistant", "content": "11."}]},
        {"chosen": [{"role": "user", "content": "6 plus 6?"},
                    {"role": "assistant", "content": "12."}],
         "rejected": [{"role": "user", "content": "6 plus 6?"},
                      {"role": "assistant", "content": "13."}]},
    ]  # fmt: skip
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    pairs, left = preference_pairs(read_rankings(path))
    # D > C > A = B orders D above C, A, B and C above A, B: 5 pairs (A = B gives none);
    # A > B > C on "6.", "6.", "7." orders 3 pairs, of which A > B compares "6." with itself
    first = [(c, r) for p, c, r in pairs if p[-1]["content"] == "1 plus 1?"]
    assert first == [("2", "The answer is 2."), ("2", "2."), ("2", "3."),
                     ("The answer is 2.", "2."), ("The answer is 2.", "3.")]  # fmt: skip
    assert [(c, r) for p, c, r in pairs if p[-1]["content"] == "3 plus 3?"] == [
        ("6.", "7."),
        ("6.", "7."),
    ]
    assert left == {"identical": 1, "no_pair": 1}
    assert len(pairs) == 5 + 2 + 3
    user = {"role": "user", "content": "5 plus 5?"}
    assert pairs[-2] == ([{"role": "system", "content": "Be brief."}, user], "10.", "11.")
    assert pairs[-1] == ([{"role": "user", "content": "6 plus 6?"}], "12.", "13.")
    bad = [
        ({"chosen": "8.", "rejected": "9."}, "need a 'prompt'"),
        ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
          "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
         "share every turn"),
        ({"prompt": [{"role": "user", "content": "a"}],
          "chosen": [{"role": "user", "content": "b"}],
          "rejected": [{"role": "assistant", "content": "d"}]}, "assistant's turn"),
    ]  # fmt: skip
    for record, words in bad:
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(SelfsupError, match=words):
            read_rankings(path)


def _gold_pairs(path, n: int, seed: int) -> list:
    """Rankings of four answers by the gold score, noise-free: terse and right first."""
    rng = np.random.default_rng(seed)
    out = []
    for p in problems(n, seed=seed):
        answers = [demonstration(p), f"Let me add {p.a} and {p.b}. That makes {p.a + p.b}.",
                   f"The answer is {p.a + p.b + 3}.", f"{p.a + p.b - 2}."]  # fmt: skip
        answers = [answers[i] for i in rng.permutation(4)]
        scores = [gold_score(p, a) for a in answers]
        order = sorted(range(4), key=lambda i: -scores[i])
        ranking = " > ".join("ABCD"[i] for i in order)
        out.append({"prompt": p.prompt, "completions": answers, "ranking": ranking})
    path.write_text("\n".join(json.dumps(r) for r in out) + "\n")
    return out


def _gold_of_favourite(run, pairs_file) -> float:
    """The gold score of the answer the model finds most likely among each prompt's four, by
    mean log-probability per token (the multiple-choice convention: not the shortest)."""
    from selfsup.lm.alignment.dpo import pair_batch, sequence_logprobs
    from selfsup.lm.data.chat_data import sft_example

    tokenizer = AutoTokenizerFrom(run)
    model = AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    golds = []
    for line, p in zip(pairs_file.read_text().splitlines(), problems(48, seed=77), strict=True):
        answers = json.loads(line)["completions"]
        rows = [sft_example(tokenizer, [{"role": "user", "content": p.prompt},
                                        {"role": "assistant", "content": a}], 64)
                for a in answers]  # fmt: skip
        with torch.no_grad():
            logps = sequence_logprobs(model, pair_batch([(r, r) for r in rows], 0, "cpu"))
        lengths = torch.tensor([sum(label != -100 for label in r[1]) for r in rows])
        golds.append(gold_score(p, answers[int((logps[: len(rows)] / lengths).argmax())]))
    return float(np.mean(golds))


def test_dpo_learns_the_preference_and_raises_gold(task, sft_run, capsys):  # noqa: F811
    _gold_pairs(task / "gold-pairs.jsonl", 96, seed=5)
    out = task / "dpo"
    assert main(["lm", "dpo", "--init", str(sft_run), "--data", str(task / "gold-pairs.jsonl"),
                 "--out", str(out), "--epochs", "2", "--batch-size", "16", "--lr", "2e-3",
                 "--beta", "0.1", "--max-length", "64", "--val-fraction", "0.25",
                 "--accelerator", "cpu"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("val reward acc ") and lines[-1].startswith("next: selfsup")
    rows = (out / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    # at the start the policy is the reference: every implicit reward is 0 (accuracy 1/2)
    assert float(last[header.index("val_reward_acc")]) > 0.8
    # held-out prompts: the gold of the answer the policy prefers among four rises
    _gold_pairs(task / "held-out.jsonl", 48, seed=77)
    before = _gold_of_favourite(sft_run, task / "held-out.jsonl")
    after = _gold_of_favourite(out, task / "held-out.jsonl")
    print(f"gold of the favourite answer {before:.3f} -> {after:.3f}")
    assert after > before + 0.05  # deterministic (no sampling): 0.875 -> 0.958 when written


def test_group_advantages_by_hand():
    from selfsup.lm.losses.grpo import group_advantages

    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(rewards, 4, eps=0.0 + 1e-4)
    # group 1: mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14/3)
    std = math.sqrt(14 / 3)
    expected = [(-2) / (std + 1e-4), -1 / (std + 1e-4), 0.0, 3 / (std + 1e-4), 0, 0, 0, 0]
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-6, rtol=0)
    assert torch.isfinite(adv).all()  # the tied group: zero advantages, no NaN
    with pytest.raises(SelfsupError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_k3_is_the_formula_and_never_negative():
    from selfsup.lm.losses.grpo import k3_kl

    g = torch.Generator().manual_seed(0)
    logp = -5 * torch.rand(200, generator=g, dtype=torch.float64)
    ref = -5 * torch.rand(200, generator=g, dtype=torch.float64)
    k3 = k3_kl(logp.float(), ref.float()).double()
    by_hand = [
        math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist(), strict=True)
    ]
    torch.testing.assert_close(k3, torch.tensor(by_hand, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert (k3 >= 0).all() and k3_kl(logp, logp).abs().max() == 0
    # unbiased: its mean over samples of p approaches KL(p || q) on a small distribution
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    estimate = k3_kl(p.log()[x], q.log()[x]).mean().item()
    assert estimate == pytest.approx((p * (p / q).log()).sum().item(), abs=5e-3)


def test_grpo_loss_against_a_naive_loop():
    from selfsup.lm.losses.grpo import grpo_loss

    g = torch.Generator().manual_seed(1)
    b, t, clip, beta = 4, 5, 0.2, 0.1
    old = -3 * torch.rand(b, t, generator=g, dtype=torch.float64)
    new = old + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)  # some ratios clipped
    ref = -3 * torch.rand(b, t, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    loss, stats = grpo_loss(new, old, ref, adv, mask.double(), clip, beta)
    per_answer = []
    for i in range(b):
        terms = []
        for j in range(t):
            if not mask[i, j]:
                continue
            ratio = math.exp(new[i, j] - old[i, j])
            clipped = min(max(ratio, 1 - clip), 1 + clip)
            d = ref[i, j].item() - new[i, j].item()
            k3 = math.exp(d) - d - 1
            terms.append(-min(ratio * adv[i].item(), clipped * adv[i].item()) + beta * k3)
        per_answer.append(sum(terms) / len(terms))
    assert loss.item() == pytest.approx(sum(per_answer) / b, rel=1e-9)
    assert 0 < stats["clip"] < 1


def _reward_model(task, sft_run):  # noqa: F811
    from selfsup.lm.alignment.reward import train_reward
    from selfsup.lm.options import TuneConfig

    if not (task / "rm-gold" / "hf").is_dir():
        _gold_pairs(task / "rm-pairs.jsonl", 32, seed=11)
        train_reward(TuneConfig(init=str(sft_run), data=str(task / "rm-pairs.jsonl"),
                                out=str(task / "rm-gold"), epochs=1, batch_size=8,
                                max_length=64, accelerator="cpu"))  # fmt: skip
    return task / "rm-gold"


def test_grpo_on_the_gold_score_raises_it(task, sft_run, capsys):  # noqa: F811
    rm, data = _reward_model(task, sft_run), task / "data"
    assert main(["lm", "grpo", "--policy", str(sft_run), "--reward", str(rm), "--prompts",
                 str(data / "rl.jsonl"), "--eval-prompts", str(data / "eval.jsonl"), "--gold",
                 "arithmetic", "--reward-from", "gold", "--out", str(task / "grpo"),
                 "--iterations", "20", "--eval-every", "20", "--eval-samples", "16",
                 "--group-size", "8", "--prompts-per-iteration", "4", "--lr", "3e-3",
                 "--max-new-tokens", "20", "--accelerator", "cpu"]) == 0  # fmt: skip
    summary = capsys.readouterr().out.splitlines()[-3:]
    assert summary[1].startswith("held-out proxy ") and "after iteration 20" in summary[1]
    rows = (task / "grpo" / "eval.csv").read_text().splitlines()
    header = rows[0].split(",")
    first, last = (float(r.split(",")[header.index("gold")]) for r in (rows[1], rows[-1]))
    print(f"held-out gold {first:.3f} -> {last:.3f}")
    assert last > first + 0.1  # 0.06 -> 0.25 when written (16 prompts, deterministic seeds)


def test_grpo_kl_blow_up_stops_with_a_loadable_policy(task, sft_run, capsys):  # noqa: F811
    from selfsup.lm.alignment.rlhf import load_policy

    rm, data = _reward_model(task, sft_run), task / "data"
    common = ["lm", "grpo", "--policy", str(sft_run), "--reward", str(rm), "--prompts",
              str(data / "rl.jsonl"), "--eval-samples", "2", "--group-size", "4",
              "--prompts-per-iteration", "2", "--minibatch", "8", "--lr", "3e-3",
              "--max-new-tokens", "8", "--max-kl", "1e-6", "--accelerator", "cpu"]  # fmt: skip
    # iteration 1 samples from the reference itself (KL 0) and is saved; iteration 2's KL is
    # above the bound: the run stops and names iteration 1's policy
    assert main([*common, "--out", str(task / "grpo-kl"), "--iterations", "3",
                 "--eval-every", "1"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "GRPO stopped at iteration 2" in err and "exceeds --max-kl 1e-06" in err
    assert err.endswith(f"the last good policy is {task / 'grpo-kl' / 'iter0001'} (lower --lr, "
                        "raise --beta)")  # fmt: skip
    tokenizer, _ = load_policy(task / "grpo-kl" / "iter0001")
    assert tokenizer.get_vocab() == AutoTokenizerFrom(sft_run).get_vocab()
    # nothing saved before the stop: the folder is removed, so the same command can run again
    assert main([*common, "--out", str(task / "grpo-kl2"), "--iterations", "3",
                 "--eval-every", "3"]) == 2  # fmt: skip
    assert "is removed" in capsys.readouterr().err and not (task / "grpo-kl2").exists()
    assert main([*common, "--out", str(task / "x"), "--group-size", "1"]) == 2
    assert "--group-size must be at least 2" in capsys.readouterr().err


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 plus 3?"}],
    [{"role": "system", "content": "be brief."}, {"role": "user", "content": "7 + 8 = ?"}],
    [
        {"role": "system", "content": " spaces  around "},
        {"role": "user", "content": "what is 1 plus 1?"},
        {"role": "assistant", "content": "The answer is 2."},
        {"role": "user", "content": "and {{ 2 }} plus 2?\n"},
    ],
    [{"role": "user", "content": "4 plus 4?"}, {"role": "assistant", "content": "8."}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_the_exported_tokenizer_renders_chats_as_selfsup_does(sft_run, messages):  # noqa: F811
    from selfsup.lm.data.conversations import chat_segments, render_prompt, tokenize_chat

    tokenizer = AutoTokenizerFrom(sft_run)  # as saved in RUN/hf, read back from disk
    whole = "".join(text for text, _ in chat_segments(messages))
    assert tokenizer.apply_chat_template(messages, tokenize=False) == whole
    if messages[-1]["role"] == "user":
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt == render_prompt(messages) == whole + "<ASSISTANT>"
    if all(c in ALPHABET for m in messages for c in m["content"]):  # the tiny vocabulary's
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
        assert list(ids["input_ids"]) == tokenize_chat(tokenizer, messages)[0]
    with pytest.raises(Exception, match="unknown role: tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_dpo_with_no_usable_pair_is_one_line(tmp_path, capsys):
    records = [
        {"prompt": "1 plus 1?", "completions": ["2.", "2."], "ranking": "A > B"},  # identical
        {"prompt": "2 plus 2?", "completions": ["4.", "5."], "ranking": "A = B"},  # full tie
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert main(["lm", "dpo", "--init", str(tmp_path / "sft"), "--data", str(path), "--out",
                 str(tmp_path / "out"), "--val-fraction", "0"]) == 2  # fmt: skip
    captured = capsys.readouterr()
    assert "left out 1 pairs whose chosen and rejected answers are identical and 1 rankings " \
        "with no strictly ordered pair" in captured.out  # fmt: skip
    assert captured.err.count("\n") == 1 and "no preference pair with two different" in captured.err
    assert not (tmp_path / "out").exists()
    assert main(["lm", "dpo", "--init", "x", "--data", str(path), "--out", "y", "--beta", "0"]) == 2
    assert "--beta must be positive" in capsys.readouterr().err


def test_grpo_single_update_equals_a_step_by_hand(sft_run):  # noqa: F811
    """With one update per batch GRPO skips the separate pass of the sampling policy; the step
    must equal the two-pass definition done by hand (old log-probs from a no-grad pass)."""
    import copy

    from selfsup.lm.alignment.grpo import GRPOTrainer
    from selfsup.lm.alignment.grpo import Options as GRPOConfig
    from selfsup.lm.alignment.rollout import forward_response, sample
    from selfsup.lm.losses.grpo import group_advantages, grpo_loss

    tokenizer = AutoTokenizerFrom(sft_run)
    policy = AutoModelForCausalLM.from_pretrained(sft_run / "hf")
    by_hand = copy.deepcopy(policy)
    seven = tokenizer.convert_tokens_to_ids("7")
    config = GRPOConfig(policy="p", reward="r", prompts="q", out="o", group_size=4,
                        minibatch=8, lr=1e-3, beta=0.1, max_new_tokens=10)  # fmt: skip

    def score(rollout, prompt_of):
        return ((rollout.responses == seven) & rollout.response_mask.bool()).float().sum(1)

    conversations = [[{"role": "user", "content": f"what is {i} plus 7?"}] for i in range(2)]
    GRPOTrainer(policy, tokenizer, config).step(conversations, [0, 1], seed=3, score=score)
    reference = copy.deepcopy(by_hand).eval()
    grouped = [c for c in conversations for _ in range(4)]
    r = sample(by_hand.eval(), tokenizer, grouped, 10, 1.0, 0, 3)
    rewards = score(r, None)
    assert rewards.std() > 0  # the groups hold different rewards: the step moves the policy
    with torch.no_grad():
        old = forward_response(by_hand, r)[1]
        ref = forward_response(reference, r)[1]
    optimizer = torch.optim.AdamW(by_hand.parameters(), lr=1e-3, weight_decay=0.0)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    part = dataclasses.replace(
        r, sequences=r.sequences[order], attention_mask=r.attention_mask[order],
        response_mask=r.response_mask[order], ended=r.ended[order],
    )  # fmt: skip
    logprobs = forward_response(by_hand, part)[1]
    loss, _ = grpo_loss(logprobs, old[order], ref[order], group_advantages(rewards, 4)[order],
                        r.response_mask[order].float(), 0.2, 0.1)  # fmt: skip
    loss.backward()
    torch.nn.utils.clip_grad_norm_(by_hand.parameters(), 1.0)
    optimizer.step()
    moved = 0.0
    for (name, a), b in zip(policy.named_parameters(), by_hand.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
        moved = max(moved, (b - reference.get_parameter(name)).abs().max().item())
    assert moved > 1e-4
