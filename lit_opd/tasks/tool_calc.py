"""A tiny tool-use task: sums worked out through an ``add`` tool, one call per assistant turn.

The user asks for a sum of 2-4 terms; the assistant never adds by itself, it calls the tool::

    user:      37+45+12
    assistant: CALL add 37 45
    tool:      82
    assistant: CALL add 82 12
    tool:      94
    assistant: 94

A sum of n terms is a trajectory of n assistant turns: n − 1 tool calls (the running total and the
next term) and the final answer, which copies the last tool output. Every step is copying from the
context, so a small character-level model learns it in a few hundred steps, while each turn still
depends on the history in a different way (the first reads the question, later ones the last tool
output): what step-level agentic distillation (OPAD) splits and trains on.

The tool is deterministic (:func:`run_tool`), and the verifier executes calls: a call turn is
correct when it is a well-formed call whose result equals the recorded call's (``CALL add 45 37``
is as good as ``CALL add 37 45``), the final turn when it is the recorded number.

Chat format: the character tokenizer's template (:func:`tool_calc_tokenizer`) renders every message
as ``<bos>{role}: {content}<eos>`` — system, user, assistant and tool alike — and a generation
prompt as ``<bos>assistant: ``.
"""

from __future__ import annotations

import random
import re

from transformers import PreTrainedTokenizerFast

from lit_opd.errors import SettingError
from lit_opd.tasks.base import Task
from lit_opd.tasks.tokenizer import char_tokenizer

CALL = re.compile(r"CALL (\w+)((?: -?\d+)+)")
TOOLS = {"add": sum}


def format_call(tool: str, *args: int) -> str:
    """The assistant's text for a call: ``CALL add 37 45``."""
    return " ".join(["CALL", tool, *map(str, args)])


def parse_call(text: str) -> tuple[str, list[int]] | None:
    """(tool, integer arguments) when ``text`` is exactly one call, else None."""
    match = CALL.fullmatch(text.strip())
    if match is None:
        return None
    return match.group(1), [int(arg) for arg in match.group(2).split()]


def run_tool(text: str) -> str | None:
    """The tool's output for an assistant turn, or None when the turn is not a call of a known tool
    (then it is a final answer, and a multi-turn rollout ends there)."""
    call = parse_call(text)
    if call is None or call[0] not in TOOLS:
        return None
    return str(TOOLS[call[0]](call[1]))


def tool_calc_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer with its chat template (renders the ``tool`` role like any other)."""
    return char_tokenizer(chat_template=True)


class ToolCalcTask(Task):
    """Sums of ``min_terms``..``max_terms`` integers of 1..``max_digits`` digits, solved by calls to
    an ``add`` tool (module docstring). Rows are whole trajectories: ``{"messages": [...], "answer":
    final sum, "id": index}``; :class:`lit_opd.rollout.TurnPrompts` splits them into turns.

    Args:
        min_terms, max_terms: terms per sum; n terms give n assistant turns.
        max_digits: most digits per term.
        system_prompt: a system message opening every trajectory (None = none).
    """

    def __init__(self, min_terms: int = 2, max_terms: int = 3, max_digits: int = 2,
                 system_prompt: str | None = None) -> None:
        if not 2 <= min_terms <= max_terms:
            raise SettingError(f"ToolCalcTask needs 2 <= min_terms <= max_terms, got min_terms={min_terms}, "
                             f"max_terms={max_terms}")
        if max_digits < 1:
            raise SettingError(f"ToolCalcTask.max_digits must be >= 1, got {max_digits}")
        self.min_terms, self.max_terms, self.max_digits = min_terms, max_terms, max_digits
        self.system_prompt = system_prompt

    def trajectory(self, terms: list[int]) -> list[dict]:
        """The recorded conversation that sums ``terms`` with the tool."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": "+".join(map(str, terms))})
        total = terms[0]
        for term in terms[1:]:
            call = format_call("add", total, term)
            messages += [{"role": "assistant", "content": call}, {"role": "tool", "content": run_tool(call)}]
            total += term
        messages.append({"role": "assistant", "content": str(total)})
        return messages

    def make_rows(self, num_rows: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        rows = []
        for index in range(num_rows):
            terms = [rng.randint(0, 10**self.max_digits - 1)
                     for _ in range(rng.randint(self.min_terms, self.max_terms))]
            rows.append({"messages": self.trajectory(terms), "answer": str(sum(terms)), "id": index})
        return rows

    def verify(self, completion: str, answer: str | None) -> bool:
        """A call turn: a well-formed call with the recorded call's result; a final turn: the number."""
        if answer is None:
            return False
        expected = run_tool(answer)
        if expected is not None:
            return run_tool(completion) == expected
        return completion.strip() == answer.strip()

    def respond(self, assistant_text: str) -> str | None:
        """The environment's reply to an assistant turn: the tool's output, or None (episode over)."""
        return run_tool(assistant_text)
