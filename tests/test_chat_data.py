"""SFT and reward-model batches: the chat markers, assistant-only labels, packing, ranking pairs."""

import pytest
import torch

from selfsup.core.errors import SelfsupError
from selfsup.core.tokenizer import train_tokenizer
from selfsup.lm.data.chat_data import (
    IGNORE,
    add_chat_tokens,
    collate,
    next_token_loss,
    pack,
    ranking_batch,
    sft_example,
)
from selfsup.lm.data.conversations import Ranking

CHAT = [{"role": "user", "content": "2 plus 3?"}, {"role": "assistant", "content": "5."}]


@pytest.fixture()
def tokenizer():
    tok = train_tokenizer(["0123456789 plus? is. The answer"], kind="char")
    assert add_chat_tokens(tok) == 5  # four markers and a padding token
    return tok


def test_chat_markers_are_single_tokens_and_end_is_eos(tokenizer):
    for marker in ("<USER>", "<ASSISTANT>", "<END>"):
        assert len(tokenizer.encode(marker, add_special_tokens=False)) == 1
    assert tokenizer.eos_token == "<END>" and tokenizer.pad_token == "<PAD>"
    assert add_chat_tokens(tokenizer) == 0  # idempotent


def test_sft_labels_only_on_the_answer(tokenizer):
    ids, labels = sft_example(tokenizer, CHAT, max_length=100)
    kept = [i for i in labels if i != IGNORE]
    assert tokenizer.decode(kept) == "5.<END>"
    assert tokenizer.decode(ids) == "<USER>2 plus 3?<END><ASSISTANT>5.<END>"


def test_loss_ignores_prompt_positions(tokenizer):
    batch = collate([sft_example(tokenizer, CHAT, 100), sft_example(tokenizer, CHAT[:2], 100)], 0)
    vocab = len(tokenizer)
    logits = torch.randn(*batch["input_ids"].shape, vocab, requires_grad=True)
    next_token_loss(logits, batch["labels"]).backward()
    predicts_answer = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_answer[:, :-1] = batch["labels"][:, 1:] != IGNORE
    grad_norm = logits.grad.norm(dim=-1)
    assert (grad_norm[~predicts_answer] == 0).all()  # prompt and padding: no loss at all
    assert (grad_norm[predicts_answer] > 0).all()
    # the value is the plain cross-entropy of the answer tokens
    rows, cols = predicts_answer.nonzero(as_tuple=True)
    expected = torch.nn.functional.cross_entropy(
        logits[rows, cols], batch["labels"][rows, cols + 1]
    )
    assert next_token_loss(logits, batch["labels"]).item() == pytest.approx(expected.item())


def test_no_answer_tokens_is_an_error():
    with pytest.raises(SelfsupError, match="no assistant token"):
        next_token_loss(torch.zeros(1, 3, 5), torch.full((1, 3), IGNORE))


def test_packing_keeps_every_token_and_its_label(tokenizer):
    examples = [sft_example(tokenizer, CHAT, 100) for _ in range(5)]
    blocks = pack(examples, block=16)
    assert all(len(ids) <= 16 for ids, _ in blocks)
    assert [i for ids, _ in blocks for i in ids] == [i for ids, _ in examples for i in ids]
    assert [x for _, lab in blocks for x in lab] == [x for _, lab in examples for x in lab]


def test_ranking_batch_pairs(tokenizer):
    rankings = [
        Ranking("2 plus 3?", ("5.", "6.", "4.", "The answer is 5."), ((3,), (0,), (1, 2))),
        Ranking("1 plus 1?", ("2.", "3."), ((0,), (1,))),
    ]
    batch = ranking_batch(tokenizer, rankings, max_length=64)
    assert batch["input_ids"].shape[0] == 6
    assert batch["pairs"].tolist() == [[3, 0], [3, 1], [3, 2], [0, 1], [0, 2], [4, 5]]
    assert batch["prompt_of_pair"].tolist() == [0, 0, 0, 0, 0, 1]
    last = batch["attention_mask"].sum(1) - 1
    ends = batch["input_ids"][torch.arange(6), last]
    assert (ends == tokenizer.convert_tokens_to_ids("<END>")).all()
