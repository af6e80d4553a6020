"""GRPO on reward functions written as TRL's, and GRPO's loss variants (Dr GRPO, DAPO, GSPO):
the losses against float64 formulas from the papers and TRL's own loss code on the same tensors,
the advantages and the weighted sum against hand computations, the calling convention and its
one-line errors, and short runs on the arithmetic task."""

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_rlhf import sft_run, task  # noqa: F401  (module fixtures)

from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.lm.alignment import rewards as rw
from selfsup.lm.data.arithmetic import gold_score, problem_of
from selfsup.lm.losses.grpo import flat_groups, group_advantages, grpo_loss

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = Path(__file__).parents[1] / "docs" / "examples" / "arithmetic_rewards.py"
VARIANTS = [
    (loss, importance, high)
    for loss in ("grpo", "bnpo", "dr-grpo", "dapo")
    for importance in ("token", "sequence")
    for high in (None, 0.28)
]


def _batch(seed: int = 1, b: int = 4, t: int = 5):
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(b, t, generator=g, dtype=torch.float64)
    new = old + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)  # some ratios clipped
    ref = -3 * torch.rand(b, t, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0.0]])
    return new, old, ref, adv, mask.double()


def _by_hand(new, old, ref, adv, mask, loss, importance, clip, high, beta, max_tokens, tokens):
    """The papers' objectives, one token at a time in float64: DeepSeekMath (grpo), DAPO's
    token-level sum (bnpo: this batch's tokens; dapo: `tokens`), Dr GRPO's constant, GSPO's
    sequence ratio s_i = (π/π_old)^(1/|y_i|)."""
    b, t = mask.shape
    total, per_answer, count = 0.0, [], 0
    for i in range(b):
        js = [j for j in range(t) if mask[i, j]]
        seq = math.exp(sum(new[i, j] - old[i, j] for j in js) / len(js))
        terms = []
        for j in js:
            ratio = seq if importance == "sequence" else math.exp(new[i, j] - old[i, j])
            clipped = min(max(ratio, 1 - clip), 1 + high)
            d = ref[i, j].item() - new[i, j].item()
            k3 = math.exp(d) - d - 1
            terms.append(-min(ratio * adv[i].item(), clipped * adv[i].item()) + beta * k3)
        per_answer.append(sum(terms) / len(terms))
        total += sum(terms)
        count += len(terms)
    return {
        "grpo": sum(per_answer) / b,
        "bnpo": total / count,
        "dr-grpo": total / (b * max_tokens),
        "dapo": total / tokens,
    }[loss]


@pytest.mark.parametrize(("loss", "importance", "high"), VARIANTS)
def test_loss_variants_are_the_papers_formulas(loss, importance, high):
    new, old, ref, adv, mask = _batch()
    got, stats = grpo_loss(new, old, ref, adv, mask, 0.2, 0.1, loss_type=loss, clip_high=high,
                           importance=importance, max_tokens=7, tokens=17.0)  # fmt: skip
    want = _by_hand(new, old, ref, adv, mask, loss, importance, 0.2, high or 0.2, 0.1, 7, 17.0)
    assert got.item() == pytest.approx(want, rel=1e-9)
    assert 0 <= stats["clip"] <= 1


def _trl_loss(new, old, ref, adv, mask, loss, importance, clip, high, beta, max_tokens, tokens,
              steps):  # fmt: skip
    """TRL's GRPOTrainer._compute_loss on these tensors: a stub trainer whose model pass returns
    `new` (the generation batch held `tokens * steps` tokens over `steps` updates)."""
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer

    b, t = mask.shape
    identity = SimpleNamespace(
        num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x, sync_gradients=True
    )
    stub = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, beta=beta,
        importance_sampling_level=importance, loss_type=loss.replace("-", "_"),
        epsilon_low=clip, epsilon_high=high, use_vllm=False, model=SimpleNamespace(training=True),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=steps),
        current_gradient_accumulation_steps=1, max_completion_length=max_tokens,
        accelerator=identity, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (new, torch.zeros_like(new), None),
    )  # fmt: skip
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1),
        "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
        "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(tokens * steps, dtype=torch.float64),
    }  # fmt: skip
    return GRPOTrainer._compute_loss(stub, None, inputs)


@pytest.mark.parametrize(("loss", "importance", "high"), VARIANTS)
def test_loss_variants_match_trls_loss_and_gradient(loss, importance, high):
    new, old, ref, adv, mask = _batch(2)
    ours_in, trl_in = new.clone().requires_grad_(), new.clone().requires_grad_()
    ours, _ = grpo_loss(ours_in, old, ref, adv, mask, 0.2, 0.05, loss_type=loss, clip_high=high,
                        importance=importance, max_tokens=6, tokens=4.5)  # fmt: skip
    theirs = _trl_loss(trl_in, old, ref, adv, mask, loss, importance, 0.2, high or 0.2, 0.05, 6,
                       4.5, steps=2)  # fmt: skip
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, trl_in.grad, rtol=1e-10, atol=1e-12)


def _nan_std(values):
    xs = [v for v in values if not math.isnan(v)]
    if len(xs) < 2:
        return math.nan
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_scale_and_skip_unscored_answers(scale):
    nan = math.nan
    rewards = [1.0, nan, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5, 2.0, nan, nan, nan]
    adv = group_advantages(torch.tensor(rewards), 4, scale=scale)
    batch_std = _nan_std(rewards)
    for g in range(3):
        group = rewards[4 * g : 4 * g + 4]
        scored = [x for x in group if not math.isnan(x)]
        mean = sum(scored) / len(scored)
        std = {"group": _nan_std(group), "batch": batch_std, "none": None}[scale]
        for k, r in enumerate(group):
            want = 0.0 if math.isnan(r) else (r - mean) / (1 if std is None else std + 1e-4)
            want = 0.0 if math.isnan(want) else want  # one scored answer: no spread, no signal
            assert adv[4 * g + k].item() == pytest.approx(want, abs=1e-6)
    assert flat_groups(torch.tensor(rewards), 4).tolist() == [False, True, True]


def test_weighted_sum_skips_none_as_trl():
    nan = math.nan
    per_source = torch.tensor([[1.0, 0.5], [nan, 0.5], [0.0, nan], [nan, nan]])
    total = rw.combine(per_source, [2.0, -1.0])
    assert total[:3].tolist() == [1.5, -0.5, 0.0] and math.isnan(total[3])
    assert rw.reward_weights("", 2) == [1.0, 1.0] and rw.reward_weights("1, 0.5", 2) == [1, 0.5]
    with pytest.raises(SelfsupError, match="expected 3 finite numbers"):
        rw.reward_weights("1,2", 3)


def test_trl_inputs_standard_and_conversational():
    records = [
        {"prompt": "1 + 2 = ?", "a": 1, "b": 2},
        {"messages": [{"role": "user", "content": "hi"}], "a": 5, "extra": "x"},
    ]
    conversations = [[{"role": "user", "content": "1 + 2 = ?"}], records[1]["messages"]]
    prompts, conversational, columns = rw.trl_inputs(records, conversations)
    assert prompts == ["1 + 2 = ?", records[1]["messages"]] and conversational == [False, True]
    assert columns == {"a": [1, 5], "b": [2, None], "extra": [None, "x"]}
    seen = {}

    def fn(prompts, completions, completion_ids, **kw):
        seen.update(completions=completions, ids=completion_ids, **kw)
        return [1, None]

    out = rw.call_reward_fn(rw.RewardFn("f.py:fn", fn), prompts, ["3.", "hello"],
                            conversational, [[1], [2, 3]], columns)  # fmt: skip
    assert out[0] == 1 and math.isnan(out[1])
    assert seen["completions"] == ["3.", [{"role": "assistant", "content": "hello"}]]
    assert seen["ids"] == [[1], [2, 3]] and seen["a"] == [1, 5]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("raise KeyError('answer')", "reward function r.py:f raised KeyError: 'answer'"),
        ("return [1.0]", "returned 1 rewards for 2 answers"),
        ("return [1.0, 'x']", "returned 'x' for answer 1 ('b'): expected a finite number or None"),
        ("return [float('inf'), 0]", "returned inf for answer 0"),
        ("return 3", "returned 3, not a list of rewards"),
    ],
)
def test_a_bad_reward_function_is_one_line(tmp_path, body, message):
    (tmp_path / "r.py").write_text(f"def f(completions, **kw):\n    {body}\n")
    (fn,) = rw.load_reward_fns(f"{tmp_path / 'r.py'}:f")
    with pytest.raises(rw.RewardFnError) as e:
        rw.call_reward_fn(fn, ["p", "q"], ["a", "b"], [False, False], [[1], [2]], {})
    text = str(e.value).replace(str(tmp_path) + "/", "")
    assert message in text and "\n" not in text


def test_a_reward_file_that_does_not_load_is_one_line(tmp_path):
    (tmp_path / "bad.py").write_text("import no_such_module_here\n")
    (tmp_path / "ok.py").write_text("X = 1\ndef f(completions, **kw):\n    return []\n")
    cases = {
        f"{tmp_path}/none.py:f": "no such file",
        f"{tmp_path}/bad.py:f": "does not import: ModuleNotFoundError",
        f"{tmp_path}/ok.py:g": "has no function 'g'",
        f"{tmp_path}/ok.py:X": "has a non-callable 'X'",
        "ok.py": "expected FILE.py:NAME",
    }
    for spec, message in cases.items():
        with pytest.raises(SelfsupError, match=message):
            rw.load_reward_fns(spec)
    a, b = rw.load_reward_fns(f"{tmp_path}/ok.py:f,{tmp_path}/ok.py:f")
    assert a.fn is b.fn and a.name == "f"  # a file is imported once


def test_the_example_rewards_sum_to_the_gold_score():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("arithmetic_rewards", EXAMPLE)
    ex = module_from_spec(spec)
    spec.loader.exec_module(ex)
    answers = ["7.", " 7 . ", "The answer is 7.", "It is 7. Yes.", "6.", "", "  ", "seven",
               "7 is the sum of the two.", "-7."]  # fmt: skip
    records = [{"prompt": "3 + 4 = ?", "a": 3, "b": 4}] * len(answers)
    correct = ex.correct(["p"] * len(answers), answers, [3] * len(answers), [4] * len(answers))
    style = ex.one_short_sentence(answers)
    for answer, c, s, record in zip(answers, correct, style, records, strict=True):
        assert c + s == gold_score(problem_of(record), answer), answer
    conv = [[{"role": "assistant", "content": "7."}]]
    assert ex.correct(["p"], conv, [3], [4]) == [1.0] and ex.correct(["p"], conv, [None], [4]) == [
        None
    ]
    assert ex.short(["ab", "abcd"]) == [-0.2, -0.4]


def test_reward_fn_repeats_on_the_command_line():
    import argparse

    from selfsup.cli.lm.common import add_stage_arguments
    from selfsup.lm.alignment import ALIGN

    parser = argparse.ArgumentParser()
    add_stage_arguments(parser, ALIGN.options("grpo"))
    args = parser.parse_args(["--reward-fn", "a.py:f", "--reward-fn", "b.py:g"])
    assert args.reward_fn == "a.py:f,b.py:g"
    parser.set_defaults(reward_fn="c.py:h")  # a --config file's value: the flags replace it
    assert parser.parse_args(["--reward-fn", "a.py:f"]).reward_fn == "a.py:f"
    assert parser.parse_args([]).reward_fn == "c.py:h"


def _grpo(sft, data, out, *extra):
    return main(["lm", "grpo", "--policy", str(sft), "--prompts", str(data / "rl.jsonl"),
                 "--eval-prompts", str(data / "eval.jsonl"), "--gold", "arithmetic", "--out",
                 str(out), "--iterations", "2", "--eval-every", "1", "--eval-samples", "4",
                 "--group-size", "4", "--prompts-per-iteration", "2", "--lr", "3e-3",
                 "--max-new-tokens", "12", "--accelerator", "cpu", *extra])  # fmt: skip


def _column(path, name):
    rows = [r.split(",") for r in path.read_text().splitlines()]
    return [float(r[rows[0].index(name)]) for r in rows[1:]]


def test_reward_functions_alone_train_exactly_as_the_gold(task, sft_run):  # noqa: F811
    """The example's checker and format reward (weights 1, 1) are the gold score: with the same
    seeds the run without a reward model equals --reward-from gold step for step."""
    data = task / "data"
    fns = [f"--reward-fn={EXAMPLE}:correct", f"--reward-fn={EXAMPLE}:one_short_sentence"]
    assert _grpo(sft_run, data, task / "g-gold", "--reward-from", "gold") == 0
    assert _grpo(sft_run, data, task / "g-fns", *fns, "--reward-weights", "1,1") == 0
    gold, own = task / "g-gold", task / "g-fns"
    assert _column(gold / "metrics.csv", "reward") == _column(own / "metrics.csv", "reward")
    assert _column(gold / "eval.csv", "gold") == _column(own / "eval.csv", "gold")
    # without a reward model the held-out proxy is the functions' sum: the gold itself
    assert _column(own / "eval.csv", "proxy") == _column(own / "eval.csv", "gold")
    correct = _column(own / "metrics.csv", "reward/correct")
    assert len(correct) == 2 and all(0 <= c <= 1 for c in correct)
    assert "reward_fn:" in (own / "config.yaml").read_text()


def test_a_failing_reward_function_stops_naming_it_and_keeps_the_saved_policy(
    task, sft_run, capsys  # noqa: F811
):  # fmt: skip
    data = task / "data"
    (task / "flaky.py").write_text(
        "calls = []\n"
        "def flaky(prompts, completions, a, **kw):\n"
        "    calls.append(1)\n"
        "    return [0.0] * len(completions) if len(calls) < 4 else ['oops'] * len(completions)\n"
    )  # evaluation 0, iteration 1, evaluation 1 (iter0001 saved), then iteration 2 fails
    assert _grpo(sft_run, data, task / "g-bad", f"--reward-fn={task / 'flaky.py'}:flaky") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GRPO stopped at iteration 2: reward function" in err[0]
    assert "flaky.py:flaky returned 'oops' for answer 0" in err[0]
    assert err[0].endswith(f"the last saved policy is {task / 'g-bad' / 'iter0001'} (selfsup lm "
                           f"chat {task / 'g-bad' / 'iter0001'})")  # fmt: skip
    assert (task / "g-bad" / "iter0001").is_dir()
    assert _grpo(sft_run, data, task / "g-none", "--loss-type", "ppo") == 2
    assert (
        "--loss-type 'ppo': expected one of grpo | bnpo | dr-grpo | dapo" in capsys.readouterr().err
    )
    assert _grpo(sft_run, data, task / "g-none") == 2
    assert "--reward is required" in capsys.readouterr().err
    (task / "none.py").write_text(
        "def f(completions, **kw):\n    return [None] * len(completions)\n"
    )
    assert _grpo(sft_run, data, task / "g-none", f"--reward-fn={task / 'none.py'}:f") == 2
    err = capsys.readouterr().err
    assert "at the held-out evaluation at iteration 0: every reward function returned None for " \
        "all 4 answers" in err and "is removed" in err  # fmt: skip
    assert not (task / "g-none").exists()


def test_variants_run_end_to_end(task, sft_run):  # noqa: F811
    data = task / "data"
    args = ["--reward-from", "gold", "--loss-type", "dapo", "--epsilon-high", "0.28",
            "--scale-rewards", "none", "--importance-sampling", "sequence", "--skip-flat-groups",
            "--minibatch", "4", "--beta", "0"]  # fmt: skip
    assert _grpo(sft_run, data, task / "g-dapo", *args) == 0
    flat = _column(task / "g-dapo" / "metrics.csv", "flat_groups")
    assert len(flat) == 2 and all(0 <= f <= 1 for f in flat)
    config = json.dumps((task / "g-dapo" / "config.yaml").read_text())
    assert "dapo" in config and "sequence" in config


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reward_scores_read_where_each_answer_ends_when_pad_is_eos(arch):
    """A reward model whose padding id is its end token (pad = eos, as a tokenizer without a pad
    token gets), scoring answers that end with that token and hold it inside: each score is the
    model's at the row's last attended token (its whole conversation alone, no padding), not
    at the last token unequal to the pad id, where transformers' pooling reads it."""
    import copy

    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    from selfsup.lm.alignment.rollout import Rollout, reward_scores

    end = 1  # eos == pad
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             num_labels=1, pad_token_id=end, eos_token_id=end)  # fmt: skip
        model = LlamaForSequenceClassification(config).eval()
    else:
        config = GPT2Config(vocab_size=32, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                            num_labels=1, pad_token_id=end, bos_token_id=end,
                            eos_token_id=end)  # fmt: skip
        model = GPT2ForSequenceClassification(config).eval()
    prompts = torch.tensor([[end, end, 5, 6, 7], [8, 9, 10, 11, 12], [end, 13, 14, 15, 16]])
    prompt_mask = (torch.arange(5) >= torch.tensor([[2], [0], [1]])).long()
    answers = torch.tensor([[20, end, 21, end, end, end],  # the pad id inside, then its end
                            [22, 23, 24, 25, 26, 27],  # never ends
                            [28, 29, end, end, end, end]])  # fmt: skip
    answer_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    rollout = Rollout(torch.cat([prompts, answers], 1), torch.cat([prompt_mask, answer_mask], 1),
                      5, answer_mask, torch.tensor([True, False, True]))  # fmt: skip
    alone = copy.deepcopy(model)
    alone.config.pad_token_id = None  # one row, no padding: the score at its last token
    with torch.no_grad():
        expected = torch.stack([
            alone(input_ids=row[m.bool()][None]).logits[0, 0]
            for row, m in zip(rollout.sequences, rollout.attention_mask, strict=True)
        ])  # fmt: skip
    torch.testing.assert_close(reward_scores(model, rollout), expected, atol=1e-5, rtol=1e-5)
