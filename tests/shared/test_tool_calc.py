"""ToolCalcTask: trajectories with tool calls, the deterministic tool, the per-turn verifier and the
chat template that renders the tool role."""

from __future__ import annotations

import pytest

from lit_opd.tasks import ToolCalcTask, tool_calc_tokenizer
from lit_opd.tasks.tool_calc import format_call, parse_call, run_tool


def test_a_three_term_sum_is_three_assistant_turns_around_two_tool_calls():
    messages = ToolCalcTask(system_prompt="Use the tool.").trajectory([37, 45, 12])
    assert messages == [
        {"role": "system", "content": "Use the tool."},
        {"role": "user", "content": "37+45+12"},
        {"role": "assistant", "content": "CALL add 37 45"},
        {"role": "tool", "content": "82"},
        {"role": "assistant", "content": "CALL add 82 12"},
        {"role": "tool", "content": "94"},
        {"role": "assistant", "content": "94"},
    ]


def test_rows_are_seeded_and_their_turn_counts_follow_the_terms():
    task = ToolCalcTask(min_terms=2, max_terms=4, max_digits=1)
    rows = task.make_rows(50, seed=3)
    assert rows == task.make_rows(50, seed=3) and rows != task.make_rows(50, seed=4)
    assert [r["id"] for r in rows] == list(range(50))
    for row in rows:
        terms = [int(t) for t in row["messages"][0]["content"].split("+")]
        assert 2 <= len(terms) <= 4 and all(0 <= t <= 9 for t in terms)
        assert sum(m["role"] == "assistant" for m in row["messages"]) == len(terms)
        assert row["answer"] == row["messages"][-1]["content"] == str(sum(terms))


def test_the_tool_runs_well_formed_calls_only():
    assert parse_call(" CALL add 3 -4 10 ") == ("add", [3, -4, 10])
    assert run_tool(format_call("add", 37, 45)) == "82"
    for text in ("94", "CALL add", "CALL add 1 x", "CALL mul 2 3", "call add 1 2", "CALL add 1 2 then"):
        assert run_tool(text) is None, text


@pytest.mark.parametrize(("completion", "answer", "correct"), [
    ("CALL add 37 45", "CALL add 37 45", True),
    ("CALL add 45 37", "CALL add 37 45", True),     # the call is executed: same result, same effect
    ("CALL add 40 42", "CALL add 37 45", True),
    ("CALL add 37 46", "CALL add 37 45", False),
    ("82", "CALL add 37 45", False),                # answering instead of calling the tool
    (" 94 ", "94", True),
    ("CALL add 90 4", "94", False),                 # calling again instead of answering
    ("94", None, False),
])
def test_the_verifier_grades_calls_by_their_result_and_answers_exactly(completion, answer, correct):
    assert ToolCalcTask().verify(completion, answer) is correct


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="min_terms <= max_terms"):
        ToolCalcTask(min_terms=1)
    with pytest.raises(ValueError, match="max_digits"):
        ToolCalcTask(max_digits=0)


def test_the_chat_template_renders_every_role_and_the_generation_prompt():
    tok = tool_calc_tokenizer()
    messages = ToolCalcTask(system_prompt="S").trajectory([1, 2])[:-1]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<bos>system: S<eos><bos>user: 1+2<eos><bos>assistant: CALL add 1 2<eos>"
                    "<bos>tool: 3<eos><bos>assistant: ")
    encoded = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    assert ids.count(tok.bos_token_id) == 5 and ids.count(tok.eos_token_id) == 4
    assert tok.decode(ids, skip_special_tokens=True).endswith("tool: 3assistant: ")
