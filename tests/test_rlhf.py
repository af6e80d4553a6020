"""SFT, reward model, PPO and best-of-n on tiny Hugging Face GPT-2 models, offline."""

import dataclasses
import json
import types

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from selfsup.cli.main import main
from selfsup.core.errors import SelfsupError
from selfsup.core.tokenizer import train_tokenizer
from selfsup.lm.alignment.ppo import PPOSettings, PPOTrainer
from selfsup.lm.alignment.reward import train_reward
from selfsup.lm.alignment.rollout import forward_response, sample
from selfsup.lm.alignment.sft import sft
from selfsup.lm.data.arithmetic import (
    demonstration,
    gold_score,
    problems,
    simulated_ranking,
    write_task,
)
from selfsup.lm.data.chat_data import add_chat_tokens
from selfsup.lm.losses.ppo import policy_loss
from selfsup.lm.options import TuneConfig

ALPHABET = "0123456789 abcdefghijklmnopqrstuvwxyzACLTW?.+=,-"


def problems_of(path):
    from selfsup.lm.data.arithmetic import problem_of

    return [problem_of(json.loads(line)) for line in path.read_text().splitlines()]


def _tiny_gpt2(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=96, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The arithmetic task's files and a tiny randomly initialised base model beside them."""
    root = tmp_path_factory.mktemp("rlhf")
    write_task(root / "data", seed=0, n_sft=160, n_prompts=16)
    tokenizer = train_tokenizer([ALPHABET], kind="char")
    _tiny_gpt2(len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return root


@pytest.fixture(scope="module")
def sft_run(task):
    config = TuneConfig(
        init=str(task / "base"), data=str(task / "data" / "sft.jsonl"), out=str(task / "sft"),
        epochs=2, batch_size=8, lr=5e-3, max_length=64, accelerator="cpu",
    )  # fmt: skip
    return sft(config)


def test_sft_learns_the_answers_and_exports_a_chat_model(sft_run):
    rows = (sft_run / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    model = AutoModelForCausalLM.from_pretrained(sft_run / "hf")  # plain transformers loads it
    untrained = np.log(model.get_input_embeddings().num_embeddings)  # a uniform guess
    assert float(last[header.index("val_loss")]) < 0.75 * untrained
    assert model.get_input_embeddings().num_embeddings >= len(ALPHABET) + 5


def test_sft_resume_continues_exactly(task, monkeypatch):
    from safetensors.torch import load_file

    from selfsup.lm.models import hf

    lines = (task / "data" / "sft.jsonl").read_text().splitlines()[:48]
    (task / "sft48.jsonl").write_text("\n".join(lines) + "\n")
    config = TuneConfig(
        init=str(task / "base"), data=str(task / "sft48.jsonl"), out=str(task / "sft-full"),
        epochs=2, batch_size=8, lr=5e-3, max_length=64, accelerator="cpu",
    )  # fmt: skip
    sft(config)
    save = hf.save_hf

    def save_then_stop(run, *args):
        save(run, *args)  # after the epoch's checkpoint
        raise KeyboardInterrupt  # the user stops the run after its first epoch

    cut = TuneConfig(**{**config.__dict__, "out": str(task / "sft-cut")})
    monkeypatch.setattr(hf, "save_hf", save_then_stop)
    with pytest.raises(KeyboardInterrupt, match="last.ckpt; continue with"):
        sft(cut)
    monkeypatch.setattr(hf, "save_hf", save)
    sft(TuneConfig(**{**cut.__dict__, "resume": True}))
    full = load_file(task / "sft-full" / "hf" / "model.safetensors")
    resumed = load_file(task / "sft-cut" / "hf" / "model.safetensors")
    for k in full:
        torch.testing.assert_close(full[k], resumed[k])
    assert (task / "sft-cut" / "command.txt").read_text().count("\n") == 2


def test_a_run_folder_of_the_earlier_checkpoint_format_resumes_exactly(task, monkeypatch):
    """RUN/checkpoints/last.pt as earlier versions wrote it (model, optimizer, schedule, epoch,
    rng; weights only) resumes: it becomes last.ckpt and the run ends as an uninterrupted one."""
    from safetensors.torch import load_file

    from selfsup.lm.models import hf

    lines = (task / "data" / "sft.jsonl").read_text().splitlines()[:32]
    (task / "sft32.jsonl").write_text("\n".join(lines) + "\n")
    config = TuneConfig(
        init=str(task / "base"), data=str(task / "sft32.jsonl"), out=str(task / "old-full"),
        epochs=2, batch_size=8, lr=5e-3, max_length=64, accelerator="cpu",
    )  # fmt: skip
    sft(config)
    save = hf.save_hf

    def save_then_stop(run, *args):
        save(run, *args)
        raise KeyboardInterrupt

    old = task / "old-cut"
    monkeypatch.setattr(hf, "save_hf", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        sft(TuneConfig(**{**config.__dict__, "out": str(old)}))
    monkeypatch.setattr(hf, "save_hf", save)
    # the state after epoch 1, rewritten by hand in the earlier format
    state = torch.load(old / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save(
        {
            "model": {k.removeprefix("model."): v for k, v in state["state_dict"].items()},
            "optimizer": state["optimizer_states"][0],
            "schedule": state["lr_schedulers"][0],
            "epoch": 0,
            "rng": state["rng"],
        },
        old / "checkpoints" / "last.pt",
    )
    (old / "checkpoints" / "last.ckpt").unlink()
    metrics = (old / "metrics.csv").read_text()
    sft(TuneConfig(**{**config.__dict__, "out": str(old), "resume": True}))
    assert not (old / "checkpoints" / "last.pt").exists()
    assert torch.load(old / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    full = load_file(task / "old-full" / "hf" / "model.safetensors")
    resumed = load_file(old / "hf" / "model.safetensors")
    for k in full:
        torch.testing.assert_close(full[k], resumed[k], rtol=0, atol=0)
    assert (old / "metrics.csv").read_text().startswith(metrics)
    assert (old / "metrics.csv").read_text() == (task / "old-full" / "metrics.csv").read_text()


def test_ppo_update_moves_towards_positive_advantages(task, sft_run):
    tokenizer = AutoTokenizerFrom(sft_run)
    policy = AutoModelForCausalLM.from_pretrained(sft_run / "hf")
    five = tokenizer.convert_tokens_to_ids("5")
    trainer = PPOTrainer(
        policy, _CountReward(five), tokenizer,
        PPOSettings(rollouts=8, minibatch=8, ppo_epochs=1, lr=1e-3, max_new_tokens=8),
    )  # fmt: skip
    conversations = [[{"role": "user", "content": f"what is {i} plus 5?"}] for i in range(8)]
    exp = trainer.experience(conversations, seed=0)
    mask = exp.rollout.response_mask.float()
    before, _, _ = policy_loss(exp.logprobs, exp.logprobs, exp.advantages, mask)
    trainer.update(exp, seed=0)
    with torch.no_grad():
        _, new_logprobs, _ = trainer.model(exp.rollout)
    after, _, _ = policy_loss(new_logprobs, exp.logprobs, exp.advantages, mask)
    # one PPO step on this batch lowers its clipped surrogate loss (raises advantage-weighted
    # likelihood): the signs of rewards, advantages and ratios are wired the right way round
    assert after < before - 0.01


class _CountReward(torch.nn.Module):
    """A stand-in reward model: the number of times `token` appears in the conversation."""

    def __init__(self, token: int) -> None:
        super().__init__()
        self.token = token
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids):
        hits = ((input_ids == self.token) & attention_mask.bool()).float().sum(1, keepdim=True)
        return types.SimpleNamespace(logits=hits)


def AutoTokenizerFrom(run):  # noqa: N802 - reads like the transformers call it wraps
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run / "hf")


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_scores_match_the_sampling_distribution(sft_run, temperature):
    """PPO's log-probabilities of the sampled answers are those of the distribution `generate`
    sampled them from: Hugging Face's own processed scores (suppressed tokens, temperature)."""
    from selfsup.lm.alignment.rollout import encode_prompts

    tokenizer = AutoTokenizerFrom(sft_run)
    model = AutoModelForCausalLM.from_pretrained(sft_run / "hf").eval()
    conversations = [
        [{"role": "user", "content": "what is 2 plus 3?"}],
        [{"role": "user", "content": "7 + 8 = ?"}],
        [{"role": "user", "content": "what is 12 plus 30?"}],
    ]
    rollout = sample(model, tokenizer, conversations, 10, temperature, generator_seed=3)
    _, logprobs, _ = forward_response(model, rollout)
    # the reference: the same sampling call, asked for the scores it sampled from
    prompts = encode_prompts(tokenizer, conversations)
    torch.manual_seed(3)
    out = model.generate(
        **prompts, do_sample=True, temperature=temperature, top_k=None, top_p=None,
        max_new_tokens=10, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, suppress_tokens=list(rollout.suppressed),
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    assert torch.equal(out.sequences, rollout.sequences)  # the same answers
    scores = torch.stack(out.scores, 1).double().log_softmax(-1)  # B×T×V
    expected = scores.gather(-1, rollout.responses[..., None])[..., 0]
    real = rollout.response_mask.bool()
    assert real.sum() > 10
    torch.testing.assert_close(logprobs[real].double(), expected[real], atol=1e-4, rtol=0)
    assert not torch.isin(rollout.responses[real], torch.tensor(rollout.suppressed)).any()
    if temperature != 1.0:  # untempered scores would be off-policy: the check has power
        untempered = dataclasses.replace(rollout, temperature=1.0)
        _, plain, _ = forward_response(model, untempered)
        assert (plain[real].double() - expected[real]).abs().max() > 1e-2


def test_reward_model_learns_the_labelers_preference(task, sft_run):
    rng = np.random.default_rng(0)
    lines = []
    for p in problems(96, seed=9):
        answers = [demonstration(p), f"Let me add {p.a} and {p.b}. That makes {p.a + p.b}.",
                   f"The answer is {p.a + p.b + 3}.", ""]  # fmt: skip
        order = rng.permutation(4)
        answers = [answers[i] for i in order]
        scores = [gold_score(p, a) for a in answers]
        ranking = simulated_ranking(scores, rng, noise=0.0)
        record = {"prompt": p.prompt, "completions": answers, "ranking": ranking}
        lines.append(json.dumps({**record, "gold": scores}))
    (task / "rank.jsonl").write_text("\n".join(lines) + "\n")
    run = train_reward(
        TuneConfig(init=str(sft_run), data=str(task / "rank.jsonl"), out=str(task / "rm"),
                   epochs=2, batch_size=8, lr=2e-3, max_length=64, val_fraction=0.25,
                   accelerator="cpu")
    )  # fmt: skip
    rows = (run / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert float(last[header.index("val_pair_acc")]) > 0.75  # chance is 0.5
    # Noise-free labelers rank exactly by gold: the gold scores' ceiling is every pair.
    assert float(last[header.index("val_gold_ceiling")]) == 1.0


def test_the_pipeline_runs_from_the_command_line(task, sft_run, capsys):
    data = task / "data"
    assert main(["lm", "label", str(sft_run), "--prompts", str(data / "label.jsonl"), "--k", "3",
                 "-o", str(task / "labels.jsonl"), "--max-new-tokens", "12"]) == 0  # fmt: skip
    records = [json.loads(x) for x in (task / "labels.jsonl").read_text().splitlines()]
    assert len(records) == 16 and all(len(r["completions"]) == 3 for r in records)
    labeled = zip(records, problems_of(data / "label.jsonl"), strict=True)
    assert all(r["gold"] == [gold_score(p, a) for a in r["completions"]] for r, p in labeled)
    printed = capsys.readouterr().out
    assert "a second labeler agrees on" in printed
    agreement = printed.split("a second labeler agrees on ")[1].split("%")[0]
    stats = json.loads((task / "labels.jsonl.stats.json").read_text())  # for the report
    assert f"{100 * stats['labeler_agreement']:.1f}" == agreement and stats["prompts"] == 16
    assert main(["lm", "reward", "--init", str(sft_run), "--data", str(task / "labels.jsonl"),
                 "--out", str(task / "rm-cli"), "--epochs", "1"]) == 0  # fmt: skip
    summary = capsys.readouterr().out.splitlines()[-3:]  # where, how good, what next
    assert summary[0].startswith(f"run directory: {task / 'rm-cli'}/")
    assert summary[1].startswith("val pair acc ") and "after epoch 1" in summary[1]
    assert summary[2].startswith(f"next: selfsup lm rlhf --policy SFT_RUN --reward {task}")
    assert main(["lm", "rlhf", "--policy", str(sft_run), "--reward", str(task / "rm-cli"),
                 "--prompts", str(data / "rl.jsonl"), "--gold", "arithmetic", "--out",
                 str(task / "ppo"), "--iterations", "2", "--eval-every", "2", "--eval-samples", "4",
                 "--rollouts", "8", "--minibatch", "4", "--max-new-tokens", "12",
                 "--accelerator", "cpu"]) == 0  # fmt: skip
    summary = capsys.readouterr().out.splitlines()[-3:]
    assert summary[1].startswith("held-out proxy ") and "after iteration 2" in summary[1]
    assert summary[2] == f"next: selfsup lm chat {task / 'ppo'}"
    train_rows = (task / "ppo" / "metrics.csv").read_text().splitlines()
    eval_rows = (task / "ppo" / "eval.csv").read_text().splitlines()
    assert len(train_rows) == 3 and "ppo/clip" in train_rows[0] and "gold" in train_rows[0]
    assert len(eval_rows) == 3 and eval_rows[0] == "iteration,proxy,kl,ended,gold"
    # answers.json (for the report): the SFT model's and the policy's answers, scored by hand
    answers = json.loads((task / "ppo" / "answers.json").read_text())
    records = [json.loads(x) for x in (data / "rl.jsonl").read_text().splitlines()][:4]
    assert [row["prompt"] for row in answers] == [r["prompt"] for r in records]
    for row, problem in zip(answers, problems_of(data / "rl.jsonl")[:4], strict=True):
        for when in ("before", "after"):
            assert row[f"gold {when}"] == round(gold_score(problem, row[when]), 3)
    # the saved policy loads with the loader the next stages use (rlhf --policy, chat, best-of-n)
    from safetensors.torch import load_file

    from selfsup.lm.alignment.rlhf import load_policy

    saved_tokenizer, saved_policy = load_policy(task / "ppo" / "iter0002")
    assert saved_tokenizer.get_vocab() == AutoTokenizerFrom(sft_run).get_vocab()
    final = load_file(task / "ppo" / "hf" / "model.safetensors")  # iteration 2 is the last
    for name, tensor in saved_policy.state_dict().items():
        if name in final:
            torch.testing.assert_close(tensor, final[name])
    assert not (task / "ppo" / "iter0000").exists()  # iteration 0 is --policy itself
    capsys.readouterr()
    # Iteration 1 samples from the reference itself (KL 0); after one update the KL is above
    # any tiny bound: the run stops and names the last policy it saved.
    assert main(["lm", "rlhf", "--policy", str(sft_run), "--reward", str(task / "rm-cli"),
                 "--prompts", str(data / "rl.jsonl"), "--out", str(task / "ppo-kl"),
                 "--iterations", "3", "--eval-every", "3", "--eval-samples", "2", "--rollouts",
                 "4", "--minibatch", "4", "--max-new-tokens", "8", "--lr", "1e-3",
                 "--max-kl", "1e-6", "--accelerator", "cpu"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "PPO stopped at iteration 2" in err and "exceeds --max-kl 1e-06" in err
    assert err.endswith(f"the last good policy is the starting one, {sft_run} (lower --lr, "
                        f"raise --beta); {task / 'ppo-kl'} is removed")  # fmt: skip
    assert not (task / "ppo-kl").exists()  # nothing saved: no folder to block a retry
    assert main(["lm", "best-of-n", "--policy", str(sft_run), "--reward", str(task / "rm-cli"),
                 "--prompts", str(data / "eval.jsonl"), "--n", "1,4", "--gold", "arithmetic",
                 "--limit", "4", "--max-new-tokens", "12",
                 "--out", str(task / "bon")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "KL bound" in out and "0.636" in out  # log 4 - 3/4
    kept = json.loads((task / "bon" / "best_of_n.json").read_text())
    assert [r["n"] for r in kept] == [1, 4] and abs(kept[1]["kl_bound"] - (np.log(4) - 0.75)) < 1e-6
    assert yaml.safe_load((task / "bon" / "config.yaml").read_text())["stage"] == "best-of-n"
    # the reports of these folders: best-of-n's curve; the reward model beside the labelers
    from selfsup.reporting import report

    page = report(task / "bon").read_text()
    assert "Best-of-n" in page and "data:image/png;base64," in page
    page = report(task / "rm-cli").read_text()
    assert "labelers: a second one orders a pair as the first" in page
    assert f"{agreement}%" in page
    # one token is too few for any answer to end: each scores --no-end-score
    assert main(["lm", "best-of-n", "--policy", str(sft_run), "--reward", str(task / "rm-cli"),
                 "--prompts", str(data / "eval.jsonl"), "--n", "1", "--limit", "4",
                 "--max-new-tokens", "1", "--no-end-score", "-5"]) == 0  # fmt: skip
    assert capsys.readouterr().out.splitlines()[-1].split() == ["1", "0.000", "-5.000"]


def test_chat_holds_a_conversation(sft_run, monkeypatch, capsys):
    replies = iter(["what is 2 plus 3?", "and 4 plus 4?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    assert main(["lm", "chat", str(sft_run), "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant>") == 2


def test_bad_inputs_are_one_line_errors(task, sft_run, capsys):
    with pytest.raises(SelfsupError, match="--init is required"):
        sft(TuneConfig(data="x.jsonl", out="y"))
    with pytest.raises(SelfsupError, match="no chat markers"):
        from selfsup.lm.alignment.rlhf import load_policy

        load_policy(task / "base")
    capsys.readouterr()
    assert main(["lm", "sft", "--init", str(task / "nowhere"), "--data",
                 str(task / "data" / "sft.jsonl"), "--out", str(task / "x")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert not (task / "x").exists()
    assert add_chat_tokens(AutoTokenizerFrom(sft_run)) == 0


def test_divergence_is_named():
    from selfsup.lm.alignment.online import diverged

    good = {"ppo/policy": 0.1, "ppo/value": 0.2, "reward": 1.0, "kl": 3.0}
    assert diverged(good, 0.0) is None and diverged(good, 5.0) is None
    assert diverged({**good, "ppo/value": float("nan")}, 0.0) == "ppo/value became nan"
    assert "3.00, exceeds --max-kl 2" in diverged(good, 2.0)


def test_the_online_loop_stops_on_a_nan_and_a_ctrl_c_start_can_be_rerun(task, sft_run):
    """The loop PPO and GRPO share, with a stand-in step: a NaN at iteration 3 names the policy
    saved at iteration 2 and keeps only the good rows; after a Ctrl-C before any policy was
    saved the same command runs again, as its hint says."""
    from selfsup.lm.alignment.online import OnlineStage, run_online
    from selfsup.lm.alignment.rlhf import Options

    drawn: list[list[int]] = []

    def step(trainer, inputs, idx, seed):
        if stop_at == "ctrl-c":
            raise KeyboardInterrupt
        drawn.append(idx)
        return {"loss": float("nan") if seed == stop_at else 0.5, "reward": 0.0, "kl": 0.0}

    def policies(inputs, fabric):
        return types.SimpleNamespace(policy=inputs.policy, reference=inputs.policy)

    stage = OnlineStage("Fake", "fake", 3, ("loss",), policies, step)
    run = task / "online"
    config = Options(policy=str(sft_run), reward=str(sft_run),  # a reward head on the SFT model
                     prompts=str(task / "data" / "rl.jsonl"), out=str(run), iterations=4,
                     eval_every=2, eval_samples=2, max_new_tokens=4, accelerator="cpu")  # fmt: skip
    stop_at = 3  # the step's seed is --seed 0 + the iteration
    with pytest.raises(SelfsupError) as e:
        run_online(config, "cmd", stage)
    assert str(e.value) == (f"Fake stopped at iteration 3: loss became nan; the last good policy "
                            f"is {run / 'iter0002'} (lower --lr, raise --beta)")  # fmt: skip
    assert [r.split(",")[0] for r in (run / "metrics.csv").read_text().splitlines()] == [
        "iteration", "1", "2",
    ]  # fmt: skip
    assert [r.split(",")[0] for r in (run / "eval.csv").read_text().splitlines()] == [
        "iteration", "0", "2",
    ]  # fmt: skip
    assert (run / "iter0002").is_dir() and not (run / "hf").exists()
    assert len(drawn) == 3 and all(len(set(i)) == 3 and set(i) <= set(range(16)) for i in drawn)
    again, stop_at = task / "online-again", "ctrl-c"
    config = dataclasses.replace(config, out=str(again), iterations=2)
    with pytest.raises(KeyboardInterrupt, match="no policy was saved yet: run the same command"):
        run_online(config, "cmd", stage)
    stop_at = None
    assert run_online(config, "cmd", stage) == again  # the same command runs, as the hint says
    assert (again / "hf").is_dir() and (again / "answers.json").is_file()


def test_ppo_raises_the_reward_over_the_sft_policy(sft_run):
    from selfsup.lm.alignment.rollout import reward_scores

    tokenizer = AutoTokenizerFrom(sft_run)
    policy = AutoModelForCausalLM.from_pretrained(sft_run / "hf")
    reward = _CountReward(tokenizer.convert_tokens_to_ids("7"))
    settings = PPOSettings(
        rollouts=16, minibatch=8, ppo_epochs=2, lr=3e-3, max_new_tokens=20, no_end_score=0.0
    )
    trainer = PPOTrainer(policy, reward, tokenizer, settings)
    conversations = [[{"role": "user", "content": f"what is {i} plus {i}?"}] for i in range(16)]

    def mean_reward() -> float:  # the same 64 prompts and sampling seeds every time
        scores = [
            reward_scores(reward, sample(trainer.policy, tokenizer, conversations, 20, 1.0, 0, s))
            for s in range(4)
        ]
        return torch.cat(scores).mean().item()

    before = mean_reward()
    for iteration in range(20):
        trainer.step(conversations, seed=100 + iteration)
    after = mean_reward()
    print(f"mean reward {before:.3f} -> {after:.3f}")
    assert after > 1.5 * before + 0.1  # answers now hold "7" far more often


def _naive_gae(rewards, values, mask, gamma, lam):
    """GAE row by row in float64 Python, from its definition (an independent reference)."""
    out = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            next_value = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            out[b, t] = running
    return out


def _perturbed_trainer(sft_run, **settings):
    tokenizer = AutoTokenizerFrom(sft_run)
    policy = AutoModelForCausalLM.from_pretrained(sft_run / "hf")
    reward = _CountReward(tokenizer.convert_tokens_to_ids("5"))
    trainer = PPOTrainer(policy, reward, tokenizer, PPOSettings(**settings))
    torch.manual_seed(1)
    with torch.no_grad():  # a policy away from the reference and a value head that is not 0
        trainer.model.value_head.linear.weight.normal_(0, 0.3)
        trainer.model.value_head.linear.bias.fill_(0.2)
        for p in trainer.policy.transformer.h[-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    conversations = [[{"role": "user", "content": f"what is {i} plus 5?"}] for i in range(8)]
    return trainer, conversations


def test_the_trainer_passes_gamma_and_lambda_to_gae_in_their_places(sft_run):
    gamma, lam, beta = 0.8, 0.5, 0.3
    trainer, conversations = _perturbed_trainer(
        sft_run, rollouts=8, minibatch=8, max_new_tokens=8, gamma=gamma, lam=lam, beta=beta
    )
    exp = trainer.experience(conversations, seed=0)
    mask = exp.rollout.response_mask.double()
    with torch.no_grad():
        _, ref, _ = forward_response(trainer.reference, exp.rollout)
    # the per-token rewards by hand: -β·(log π - log π_ref), plus the score on the last token
    rewards = -beta * (exp.logprobs.double() - ref.double()) * mask
    last = mask.sum(1).long() - 1
    rewards[torch.arange(8), last] += exp.scores.double()
    assert (exp.kl.abs() > 1e-3).any() and exp.values.abs().max() > 0.05
    expected = _naive_gae(rewards.numpy(), exp.values.double().numpy(), mask.numpy(), gamma, lam)
    returns = torch.from_numpy(expected) + exp.values.double() * mask
    torch.testing.assert_close(exp.returns.double(), returns, atol=1e-5, rtol=0)
    swapped = _naive_gae(rewards.numpy(), exp.values.double().numpy(), mask.numpy(), lam, gamma)
    assert np.abs(swapped - expected).max() > 1e-2  # the check tells γ from λ
    # the advantages are the same, whitened over the real tokens (unbiased variance)
    real = torch.from_numpy(expected)[mask.bool()]
    whitened = (real - real.mean()) / real.std()
    torch.testing.assert_close(exp.advantages.double()[mask.bool()], whitened, atol=1e-4, rtol=0)


def test_target_kl_stops_the_updates_of_an_iteration_early(sft_run):
    common = dict(rollouts=8, minibatch=4, ppo_epochs=2, lr=1e-3, max_new_tokens=8)
    trainer, conversations = _perturbed_trainer(sft_run, **common)
    stats = trainer.update(trainer.experience(conversations, seed=0), seed=0)
    assert stats["ppo/updates"] == 4  # 2 epochs × 2 minibatches
    trainer, conversations = _perturbed_trainer(sft_run, **common, target_kl=1e-9)
    stats = trainer.update(trainer.experience(conversations, seed=0), seed=0)
    # The first minibatch is scored by the policy that sampled it (approximate KL exactly 0);
    # after one update the next one's is above 1e-9, so it is not applied.
    assert stats["ppo/updates"] == 1 and stats["ppo/approx_kl"] == 0.0


def test_adaptive_kl_coefficient_by_hand(sft_run):
    from selfsup.lm.alignment.ppo import adaptive_beta

    # Ziegler et al.: e = clip(KL/target - 1, -0.2, 0.2), β ← β·(1 + e·n/horizon)
    assert adaptive_beta(0.1, 3.0, 6.0, 16, 10000) == pytest.approx(0.1 * (1 - 0.2 * 16 / 10000))
    assert adaptive_beta(0.1, 6.6, 6.0, 16, 10000) == pytest.approx(0.1 * (1 + 0.1 * 16 / 10000))
    assert adaptive_beta(0.1, 60.0, 6.0, 100, 100) == pytest.approx(0.1 * 1.2)
    trainer, conversations = _perturbed_trainer(
        sft_run, rollouts=8, minibatch=8, max_new_tokens=8, beta=0.2, adaptive_kl=0.01,
        kl_horizon=40,
    )  # fmt: skip
    first = trainer.step(conversations, seed=0)
    assert first["beta"] == 0.2
    error = min(max(first["kl"] / 0.01 - 1, -0.2), 0.2)
    assert trainer.beta == pytest.approx(0.2 * (1 + error * 8 / 40)) and trainer.beta != 0.2
    beta = trainer.beta
    assert trainer.step(conversations, seed=1)["beta"] == beta  # the next batch's rewards use it
