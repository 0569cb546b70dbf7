"""The carry-trace addition task and its BPE tokenizer."""

from __future__ import annotations

import pytest

from lit_opd.tasks import CarryAdditionTask, carry_bpe_tokenizer, char_tokenizer
from lit_opd.tasks.carry_addition import carry_trace, final_result


@pytest.mark.parametrize(
    ("a", "b", "trace"),
    [
        (347, 85, "7+5+0=12|4+8+1=13|3+0+1=04|432"),
        (999, 1, "9+1+0=10|9+0+1=10|9+0+1=10|1000"),
        (10, 10, "0+0+0=00|1+1+0=02|20"),
        (5, 5005, "5+5+0=10|0+0+1=01|0+0+0=00|0+5+0=05|5010"),
    ],
)
def test_trace_on_hand_examples(a, b, trace):
    assert carry_trace(a, b) == trace


def test_rows_are_seeded_correct_and_in_the_length_range():
    task = CarryAdditionTask()
    rows = task.make_rows(500, seed=3)
    assert rows == task.make_rows(500, seed=3) and rows != task.make_rows(500, seed=4)
    for row in rows:
        a, b = row["prompt"].removesuffix("=").split("+")
        assert 2 <= len(a) <= 4 and 2 <= len(b) <= 4
        assert row["answer"] == carry_trace(int(a), int(b))
        assert final_result(row["answer"]) == str(int(a) + int(b))
        assert 20 <= len(row["answer"]) <= 41
    assert {len(row["answer"]) for row in rows} >= {20, 41}


def test_one_character_per_token_under_the_char_tokenizer():
    answer = CarryAdditionTask().make_rows(1, seed=0)[0]["answer"]
    assert len(char_tokenizer()(answer, add_special_tokens=False)["input_ids"]) == len(answer)


def test_verifier_reads_the_final_result():
    task, answer = CarryAdditionTask(), carry_trace(347, 85)
    assert task.verify(answer, answer) and task.verify(" 432\n", answer)
    assert task.verify("7+5+0=12|4+8+1=14|3+0+1=04|432", answer)  # a wrong column, the right sum
    for wrong in ("7+5+0=12|4+8+1=13|3+0+1=04|433", "7+5+0=12|4+8+1=13|3+0+1=04|", "432|7", "", "4321"):
        assert not task.verify(wrong, answer), wrong
    assert not task.verify(answer, None)


def test_strict_verifier_needs_the_whole_trace():
    task, answer = CarryAdditionTask(strict=True), carry_trace(347, 85)
    assert task.verify(f" {answer}\n", answer)
    assert not task.verify("7+5+0=12|4+8+1=14|3+0+1=04|432", answer) and not task.verify("432", answer)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="min_digits=3, max_digits=2"):
        CarryAdditionTask(3, 2)
    with pytest.raises(ValueError, match="non-negative"):
        carry_trace(-1, 2)


def test_bpe_tokenizer_is_reproducible_and_segments_differently():
    tok, char = carry_bpe_tokenizer(), char_tokenizer()
    assert tok.get_vocab() == carry_bpe_tokenizer().get_vocab()
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    row = CarryAdditionTask().make_rows(1, seed=0)[0]
    text = row["prompt"] + row["answer"]
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text)
    assert ids == tok(row["prompt"])["input_ids"] + tok(row["answer"])["input_ids"]  # "=" is its own token
    assert tok.decode(tok("Any text, 12!")["input_ids"]) == "Any text, 12!"
    assert tok.get_vocab() != char.get_vocab()


def test_bpe_dropout_varies_the_segmentation_only():
    tok, plain = carry_bpe_tokenizer(dropout=0.5), carry_bpe_tokenizer()
    assert tok.get_vocab() == plain.get_vocab()
    text = "".join(CarryAdditionTask().make_rows(1, seed=0)[0].values())
    encodings = {tuple(tok(text)["input_ids"]) for _ in range(20)}
    assert len(encodings) > 1 and all(tok.decode(list(ids)) == text for ids in encodings)
    assert len({tuple(plain(text)["input_ids"]) for _ in range(5)}) == 1
