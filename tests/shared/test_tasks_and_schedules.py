"""The addition task, the character tokenizer and the LR schedule."""

from __future__ import annotations

import pytest
import torch

from lit_opd.schedules import WarmupCosine
from lit_opd.tasks import AdditionTask, char_tokenizer


def test_addition_rows_are_seeded_and_correct():
    task = AdditionTask(1, 3)
    rows = task.make_rows(200, seed=5)
    assert rows == task.make_rows(200, seed=5) and rows != task.make_rows(200, seed=6)
    for row in rows:
        a, b = row["prompt"].rstrip("=").split("+")
        assert int(a) + int(b) == int(row["answer"]) and len(a) <= 3 and len(b) <= 3


def test_reversed_answers_and_verifier():
    task = AdditionTask(3, 3, reverse_answer=True)
    row = task.make_rows(1, seed=0)[0]
    a, b = row["prompt"].rstrip("=").split("+")
    assert row["answer"] == str(int(a) + int(b))[::-1]
    assert task.verify(f" {row['answer']}\n", row["answer"]) and not task.verify("0", row["answer"])
    assert not task.verify("1", None)


def test_bad_digit_range_is_refused():
    with pytest.raises(ValueError, match="min_digits=3, max_digits=2"):
        AdditionTask(3, 2)


def test_char_tokenizer_round_trips_and_has_fixed_specials():
    tok = char_tokenizer()
    text = "12+345=\n{\"ranking\": [3, 1]}"
    assert tok.decode(tok(text).input_ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (0, 2, 3, 104)
    assert tok.padding_side == "left"


def test_warmup_cosine_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, total_steps=10, warmup_steps=2, min_ratio=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0) and lrs[2] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    with pytest.raises(ValueError, match="warmup_steps=5, total_steps=3"):
        WarmupCosine(opt, total_steps=3, warmup_steps=5)
