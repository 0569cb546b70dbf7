"""The listwise JSON ranking task: generator, strict parser, NDCG, verifier, structural positions."""

from __future__ import annotations

import json
import math
import string

import pytest

from lit_opd.rollout.prompts import PromptTokenizer, collate_prompts
from lit_opd.rollout.sources import JsonlPrompts, TaskPrompts, check_row
from lit_opd.tasks.ranking import (
    RankingTask,
    ndcg_at_k,
    parse_ranking,
    relevance_order,
    serialise_ranking,
    structural_positions,
)

IDS4 = ["a", "b", "c", "d"]


def test_rows_are_seeded_and_answers_follow_the_relevance_order():
    task = RankingTask()
    rows = task.make_rows(50, seed=3)
    assert rows == task.make_rows(50, seed=3) and rows != task.make_rows(50, seed=4)
    for row in rows:
        check_row(row, "ranking row")
        ranking = parse_ranking(row["answer"], row["candidates"], 8)
        rel = row["relevance"]
        assert ranking == sorted(row["candidates"], key=lambda i: (-rel[i], i))
        assert row["answer"] == serialise_ranking(ranking) and " " not in row["answer"]
        assert task.verify(row["answer"], row["answer"])
        assert task.score(row["answer"], row)["ndcg@k"] == pytest.approx(1.0)


def test_hand_example_from_the_module_docstring():
    attrs = {"a": ("R", 3), "b": ("G", 7), "c": ("B", 2), "d": ("R", 6)}
    relevance, order = relevance_order("R", 5, attrs)
    assert relevance == {"a": 3, "b": 0, "c": 1, "d": 2} and order == ["a", "d", "c", "b"]
    assert relevance_order("G", 5, {"b": ("R", 1), "a": ("R", 1)})[1] == ["a", "b"]  # tie: by id
    # "color=R size<5 | a:R3 b:G7 c:B2 d:R6 e:G1 f:R4 g:B9 h:G5 >"
    attrs8 = {i: (spec[0], int(spec[1])) for i, spec in zip("abcdefgh", "R3 G7 B2 R6 G1 R4 B9 G5".split())}
    expected = '{"ranking":["a","f","d","c","e","b","g","h"]}'
    assert serialise_ranking(relevance_order("R", 5, attrs8)[1]) == expected


@pytest.mark.parametrize("k", [4, 8, 26])
def test_prompts_are_short_printable_and_round_trip_the_char_tokenizer(k, char_tok):
    rows = RankingTask(k=k).make_rows(20, seed=0)
    bound = {4: 40, 8: 60, 26: 150}[k]
    for row in rows:
        for text in (row["prompt"], row["answer"]):
            assert set(text) <= set(string.printable) - set("\t\n\r\x0b\x0c")
            assert char_tok.decode(char_tok(text, add_special_tokens=False).input_ids) == text
        assert len(row["prompt"]) <= bound and len(row["answer"]) == 12 + 4 * k + 1


@pytest.mark.parametrize(
    "text",
    [
        '{"ranking":["a","b","c","d"]',  # invalid JSON
        '{"rank":["a","b","c","d"]}',  # wrong key
        '{"ranking":["a","b","c","d"],"x":1}',  # extra key
        '{"ranking":["a","b"],"ranking":["a","b","c","d"]}',  # duplicate key
        '{"ranking":["a","b","b","d"]}',  # duplicates
        '{"ranking":["a","b","c"]}',  # K-1 ids
        '{"ranking":["a","b","c","d","e"]}',  # K+1 ids
        '{"ranking":["a","b","c","z"]}',  # unknown id
        '{"ranking":[0,1,2,3]}',  # ints, not the string ids
        '{"ranking":["a","b","c","d"]}}',  # trailing garbage
        '{"ranking":["a","b","c","d"]} and more',
        '["a","b","c","d"]',  # not an object
        "",
    ],
)
def test_parse_ranking_rejects_contract_violations(text):
    assert parse_ranking(text, IDS4, 4) is None


def test_parse_ranking_accepts_json_whitespace_and_verify_is_strict():
    assert parse_ranking(' { "ranking" : ["d", "a", "c", "b"] }\n', IDS4, 4) == ["d", "a", "c", "b"]
    task = RankingTask(k=4)
    answer = serialise_ranking(["d", "a", "c", "b"])
    assert task.verify('{"ranking": ["d", "a", "c", "b"]}', answer)
    assert not task.verify(serialise_ranking(["a", "d", "c", "b"]), answer)  # valid, wrong order
    assert not task.verify('{"ranking":["d","a","c"]}', answer) and not task.verify(answer, None)
    with pytest.raises(ValueError, match="answer="):
        task.verify(answer, "not json")


def test_ndcg_perfect_and_hand_values():
    rel = {"a": 3, "b": 0, "c": 1, "d": 2}
    assert ndcg_at_k(["a", "d", "c", "b"], rel, 4) == pytest.approx(1.0)
    # DCG = 0/log2(2) + 3/log2(3) + 1/log2(4) + 2/log2(5); IDCG = 3 + 2/log2(3) + 1/2.
    dcg, idcg = 3 / math.log2(3) + 0.5 + 2 / math.log2(5), 3 + 2 / math.log2(3) + 0.5
    assert ndcg_at_k(["b", "a", "c", "d"], rel, 4) == pytest.approx(dcg / idcg, abs=1e-6)
    assert ndcg_at_k(["b", "a", "c", "d"], rel, 4) == pytest.approx(0.683376, abs=1e-6)
    assert ndcg_at_k(["d", "a", "c", "b"], rel, 1) == pytest.approx(2 / 3, abs=1e-6)
    assert ndcg_at_k(["a", "b", "c", "d"], {i: 0 for i in IDS4}, 4) == 0.0
    with pytest.raises(ValueError, match="pred="):
        ndcg_at_k(["a", "z"], rel, 2)


def test_score_reports_validity_and_ndcg_on_parsed_outputs_only():
    task = RankingTask(k=4)
    row = {"candidates": IDS4, "relevance": {"a": 3, "b": 0, "c": 1, "d": 2}}
    out = task.score(serialise_ranking(["d", "a", "c", "b"]), row)
    assert out["valid"] and out["ndcg@1"] == pytest.approx(2 / 3, abs=1e-6) and 0 < out["ndcg@k"] < 1
    assert task.score('{"ranking":["d","a","c"]}', row) == {"valid": False, "ndcg@1": None, "ndcg@k": None}


def test_structural_positions_mark_json_punctuation_and_quotes():
    answer = serialise_ranking(["b", "a"])  # {"ranking":["b","a"]}
    positions = structural_positions(answer)
    assert "".join(answer[i] for i in positions) == '{"":["",""]}'
    assert [i for i in range(len(answer)) if i not in positions] == [2, 3, 4, 5, 6, 7, 8, 13, 17]
    assert structural_positions(answer, include_eos=True) == [*positions, len(answer)]
    assert structural_positions('{"a,b":"x\\"]"}') == [0, 1, 5, 6, 7, 12, 13]


def test_extra_row_keys_pass_through_the_prompt_pipeline(char_tok, tmp_path):
    source = TaskPrompts(RankingTask(k=4), num_rows=6, seed=1)
    rows = source.load()
    encode = PromptTokenizer(char_tok, 64, "error", use_chat_template=False, system_prompt=None)
    records = encode.rows(rows, "training")
    batch = collate_prompts(records, char_tok.pad_token_id)
    assert batch.answers == [r["answer"] for r in rows]
    answer_ids = records[0]["answer_ids"]
    assert len(answer_ids) == len(rows[0]["answer"]) + 1 and answer_ids[-1] == char_tok.eos_token_id
    assert source.verify(rows[0]["answer"], rows[0]["answer"])
    path = tmp_path / "ranking.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert JsonlPrompts(str(path)).load() == rows  # metadata survives a JSONL round trip


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"k": 1}, "k=1"), ({"k": 27}, "k=27"), ({"colors": "RR"}, "colors='RR'")]
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RankingTask(**kwargs)
