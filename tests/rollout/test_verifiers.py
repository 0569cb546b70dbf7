"""Verifiers as components: the classes, any callable, and RolloutDataModule.grade using them."""

from __future__ import annotations

import re

import pytest
import torch

from lit_opd.rollout import ExactMatch, ListPrompts, MathVerify, RegexMatch, RolloutDataModule
from lit_opd.rollout.verifiers import BOXED
from lit_opd.tasks import char_tokenizer
from tests.helpers import make_rollout_batch


def test_exact_match_strips_whitespace_and_needs_an_answer():
    verify = ExactMatch()
    assert verify(" 42\n", "42", {}) == 1.0
    assert verify("42", "43", {}) == 0.0
    assert verify("42", None, {}) == 0.0


def test_regex_match_takes_the_last_number_of_worked_solutions():
    verify = RegexMatch()
    assert verify("3 apples and 4 pears make 1,024", "1024", {}) == 1.0
    assert verify("first 7, then 8", "7", {}) == 0.0
    # The reference's own final number is extracted too (a GSM8K-style "#### 72").
    assert verify("so she has 72", "48 + 24 = 72\n#### 72", {}) == 1.0
    assert verify("no number here", "5", {}) == 0.0


def test_regex_match_boxed_group_and_first_occurrence():
    boxed = RegexMatch(pattern=BOXED, group=1)
    assert boxed(r"so \boxed{x+1} done", "x+1", {}) == 1.0
    assert boxed("x+1", "x+1", {}) == 0.0  # no \boxed{} in the completion
    assert RegexMatch(occurrence="first")("first 7, then 8", "7", {}) == 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(pattern="("), "RegexMatch.pattern='(' is not a valid regular expression"),
    (dict(pattern="a(b)", group=2), "RegexMatch.group=2 but the pattern has 1 group"),
    (dict(occurrence="middle"), "RegexMatch.occurrence='middle'"),
])
def test_regex_match_bad_settings_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RegexMatch(**kwargs)


@pytest.mark.parametrize("completion", [r"The answer is \boxed{0.5}", "1/2", r"$\frac{1}{2}$", "0.5"])
def test_math_verify_accepts_equivalent_forms(completion):
    assert MathVerify()(completion, r"\frac{1}{2}", {}) == 1.0


def test_math_verify_rejects_a_different_value_and_a_missing_answer():
    verify = MathVerify()
    assert verify(r"\boxed{3}", "1/2", {}) == 0.0
    assert verify("no math at all", "1/2", {}) == 0.0
    assert verify("1/2", None, {}) == 0.0


def test_math_verify_without_the_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "math_verify", None)  # what a missing package looks like to import
    with pytest.raises(ImportError, match=r"pip install 'lit_opd\[math\]'"):
        MathVerify()


def _graded(verifier, completions, answers, rows=None):
    tok = char_tokenizer()
    dm = RolloutDataModule(ListPrompts([{"prompt": "1+1=", "answer": "2"}]), val_size=0, verifier=verifier)
    dm.tokenizer = tok
    batch = make_rollout_batch(tok, prompts=["a"] * len(completions), completions=completions,
                               answers=answers, rows=rows)
    return dm.grade(batch)


def test_grade_uses_the_verifier_and_returns_float_scores():
    scores = _graded(RegexMatch(), ["it is 12", "it is 13"], ["12", "12"])
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0, 0.0]
    # Without a verifier the source's own (exact match) grades: "it is 12" is not "12".
    assert _graded(None, ["it is 12", "12"], ["12", "12"]).tolist() == [0.0, 1.0]


def test_any_callable_is_a_verifier_and_sees_the_row():
    def partial_credit(completion, answer, row):  # noqa: ANN001, ANN202
        return 0.5 if completion.strip() in row["accepted"] else 0.0

    rows = [{"accepted": ["12", "twelve"]}, {"accepted": ["x"]}]
    assert _graded(partial_credit, ["twelve", "y"], ["12", "x"], rows).tolist() == [0.5, 0.0]


def test_a_verifier_out_of_range_or_not_callable_is_refused():
    with pytest.raises(ValueError, match=r"verifier=.*returned 2; a verifier must return a number in \[0, 1"):
        _graded(lambda c, a, r: 2, ["1"], ["1"])
    with pytest.raises(ValueError, match="RolloutDataModule.verifier='exact' is not callable"):
        RolloutDataModule(ListPrompts([{"prompt": "x"}]), verifier="exact")
