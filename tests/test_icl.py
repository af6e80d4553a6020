"""In-context learning: the regression task, its baselines, and a transformer that learns it."""

import pytest
import torch

from selfsup.lm.evaluation.icl import (
    RegressionTransformer,
    averaging,
    evaluate_regression,
    few_shot_prompt,
    interleave,
    least_squares,
    nearest_neighbours,
    regression_batch,
    train_regression,
)


def test_sequence_layout_and_targets():
    g = torch.Generator().manual_seed(0)
    x, y = regression_batch(4, 5, 3, g)
    seq = interleave(x, y)
    assert seq.shape == (4, 10, 3)
    torch.testing.assert_close(seq[:, 0::2], x)
    torch.testing.assert_close(seq[:, 1::2, 0], y)
    assert (seq[:, 1::2, 1:] == 0).all()
    w = torch.linalg.lstsq(x[0], y[0].unsqueeze(-1)).solution  # y is exactly linear in x
    torch.testing.assert_close(x[0] @ w, y[0].unsqueeze(-1), atol=1e-5, rtol=0)


def test_baselines_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    y = torch.tensor([[2.0, -2.0, 1.0]])  # w = (2, -1)
    query = torch.tensor([[3.0, 1.0]])
    assert least_squares(x, y, query).item() == pytest.approx(5.0, abs=1e-5)
    # averaging: w = mean(y_i x_i) = ((2,0) + (0,-4) + (1,1)) / 3 = (1, -1)
    assert averaging(x, y, query).item() == pytest.approx(2.0)
    # nearest to (3, 1): (1, 1) then (1, 0) then (0, 2)
    assert nearest_neighbours(x, y, query, n=2).item() == pytest.approx(1.5)


def test_predictions_only_see_the_past():
    torch.manual_seed(0)
    model = RegressionTransformer(dims=2, points=6, width=16, layers=1, heads=2).eval()
    x, y = regression_batch(2, 6, 2, torch.Generator().manual_seed(1))
    before = model(x, y)
    x2, y2 = x.clone(), y.clone()
    x2[:, 4:] += 1.0
    y2[:, 3:] -= 2.0  # y_3 comes after x_3: the prediction for y_3 must not change either
    after = model(x2, y2)
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_a_trained_transformer_learns_in_context():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a second thread only adds overhead
    try:
        model = train_regression(
            dims=1, points=6, steps=250, batch=64, width=64, layers=2, heads=4, lr=2e-3,
            progress=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    errors = evaluate_regression(model, dims=1, points=6, samples=500).errors
    learned = errors["transformer"]
    # with no example it can only guess 0 (error about 1); with 3-5 examples it infers w
    assert learned[0] > 0.8
    assert max(learned[3:]) < 0.6
    assert sum(learned[3:]) < sum(errors["averaging"][3:])
    assert errors["least squares"][3] < 1e-6  # one example pins w down when d = 1


def test_few_shot_prompts_end_where_pretraining_text_continues():
    """The prompt's tokens are a prefix of the tokens of the same lines as the corpus writes
    them (question, space, answer): with byte-level BPE a prompt ending in a space would end in
    a lone space token instead of the answer's first token " The"."""
    from selfsup.core.tokenizer import train_tokenizer

    lines = [f"What is {a} plus {b}? The answer is {a + b}." for a in range(12) for b in range(12)]
    tokenizer = train_tokenizer(["\n".join(lines)], kind="bpe", vocab_size=300)
    demos = [("What is 2 plus 3?", "The answer is 5."), ("What is 4 plus 4?", "The answer is 8.")]
    question, answer = "What is 7 plus 1?", "The answer is 8."
    for k in (0, 1, 2):
        prompt = few_shot_prompt(demos[:k], question)
        as_in_the_corpus = "".join(f"{q} {a}\n" for q, a in demos[:k]) + f"{question} {answer}"
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        full = tokenizer.encode(as_in_the_corpus, add_special_tokens=False)
        assert full[: len(ids)] == ids, (tokenizer.convert_ids_to_tokens(ids)[-3:], k)
        assert tokenizer.decode(ids).endswith("?")
