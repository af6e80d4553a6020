"""Edge cases of the language side's inputs: generated files and strings either load or end in
one SelfsupError line (property-based, with hypothesis), and checks of runs' inputs and options."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfsup.data.conversations import read_conversations, read_prompts, read_rankings
from selfsup.errors import SelfsupError
from selfsup.lm.corpus import read_texts
from selfsup.losses.preference import LETTERS, parse_ranking

FEW = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
LOADERS = (read_conversations, read_prompts, read_rankings)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
# records that look like the real formats, so that the checks past "is it an object" run too
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "bot"]),
            "content": st.text(max_size=6),
        }
    ),
    max_size=4,
)
rankings = st.text(alphabet="ABCDEZ>= ", max_size=12)
records = st.one_of(
    st.fixed_dictionaries({"messages": messages}),
    st.fixed_dictionaries({"prompt": st.text(max_size=6), "completion": st.text(max_size=6)}),
    st.fixed_dictionaries(
        {
            "prompt": st.text(max_size=6),
            "completions": st.lists(st.text(max_size=4), max_size=4),
            "ranking": rankings,
        },
        optional={"gold": st.lists(st.floats() | st.integers() | st.booleans(), max_size=4)},
    ),
    st.fixed_dictionaries(
        {"prompt": st.text(max_size=6), "chosen": json_values, "rejected": json_values}
    ),
    st.dictionaries(st.sampled_from(["prompt", "messages", "completions", "ranking"]), json_values),
)


def _loads_or_one_line(load, path: Path) -> None:
    try:
        load(path)
    except SelfsupError as e:
        assert "\n" not in str(e) and str(e), repr(str(e))


@FEW
@given(data=st.binary(max_size=200))
def test_any_bytes_load_or_give_one_line(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    for load in LOADERS:
        _loads_or_one_line(load, path)
    for name in ("f.jsonl", "f.txt"):
        (tmp_path / name).write_bytes(data)
        _loads_or_one_line(read_texts, tmp_path / name)


@FEW
@given(lines=st.lists(records | json_values, min_size=1, max_size=4))
def test_generated_jsonl_loads_or_gives_one_line(tmp_path: Path, lines: list) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    for load in LOADERS:
        _loads_or_one_line(load, path)
    _loads_or_one_line(read_texts, path)


@FEW
@given(
    ranking=st.text(alphabet=string.ascii_uppercase[:6] + "><= ,\n", max_size=14),
    k=st.integers(0, 27),
)
def test_ranking_strings_parse_to_a_partition_or_one_line(ranking: str, k: int) -> None:
    try:
        tiers = parse_ranking(ranking, k)
    except SelfsupError as e:
        assert "\n" not in str(e)
        return
    # independent check: the letters of the string, in order, are each completion once
    letters = [c for c in ranking if c in LETTERS]
    assert sorted(letters) == sorted(LETTERS[:k])
    assert [LETTERS[i] for tier in tiers for i in tier] == letters
    assert len(tiers) == ranking.count(">") + 1


def test_binary_conversations_file_is_one_line_naming_it(tmp_path: Path, capsys) -> None:
    from selfsup.cli import main

    path = tmp_path / "conv.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n\x89PNG\r\n\x1a\n\x00\xff')
    for load in LOADERS:
        with pytest.raises(SelfsupError, match=r"conv.jsonl:2: not UTF-8 text \(byte 0x89\)"):
            load(path)
    assert main(["lm", "sft", "--init", str(tmp_path), "--data", str(path), "--out",
                 str(tmp_path / "run")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "conv.jsonl:2: not UTF-8" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("gold", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_gold_is_refused(tmp_path: Path, gold: str) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(
        f'{{"prompt": "p", "completions": ["a", "b"], "ranking": "A > B", "gold": [1, {gold}]}}\n'
    )
    with pytest.raises(SelfsupError, match=r"r.jsonl:1: 'gold' holds .*finite number"):
        read_rankings(path)
