"""Multi-turn (tool-use) trajectories as per-turn prompts: OPAD's step-level split.

A trajectory with n assistant turns becomes n rows. Row i holds the *recorded* history before
assistant turn i (system, user, earlier assistant turns and tool outputs) as ``messages``, the
recorded turn as ``answer`` (for the verifier and for dataset completions), and ``group_id``,
``turn_index`` and ``num_turns``. The student then generates only turn i, on-policy, after a
history that came from the data, so one wrong step does not derail the later ones
("teacher_forcing"). Tool outputs live only in the prompt and are never trained on.

``mode: full`` instead yields one row per trajectory, its history up to the first assistant turn,
and the student plays every turn against the tool (:mod:`lit_opd.rollout.episodes`).

Turns of a trajectory share ``group_id``; ``RolloutDataModule(group_field="group_id")`` keeps them
together and in order (:class:`~lit_opd.rollout.sampler.GroupedPromptSampler`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from lit_opd.rollout.sources import PromptSource
from lit_opd.tasks.base import Task

ROLES = ("system", "user", "assistant", "tool")
TURN_FIELDS = ("messages", "answer", "group_id", "turn_index", "num_turns")


def check_messages(messages: object, where: str) -> list[dict]:
    """A list of ``{"role": one of ROLES, "content": str}``; one error naming the message and the fix."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: a trajectory needs a non-empty list 'messages'")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise ValueError(f"{where}: messages[{i}] has role {role!r}; TurnPrompts reads the roles "
                             f"{list(ROLES)} (rename it, e.g. 'function' -> 'tool')")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] ({role}) needs a string 'content'")
    return messages


def split_turns(
    messages: list[dict], group_id: object, where: str, extra: dict | None = None,
) -> list[dict]:
    """One row per assistant turn: the recorded history before it, the turn itself as ``answer``."""
    check_messages(messages, where)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError(f"{where}: the trajectory has no assistant turn, so there is nothing to distil; "
                         "drop it or add the assistant's turns")
    if turns[0] == 0:
        raise ValueError(f"{where}: the first message is an assistant turn with no context before it; "
                         "start the trajectory with a system or user message")
    return [
        {**(extra or {}), "messages": [dict(m) for m in messages[:index]],
         "answer": messages[index]["content"], "group_id": group_id, "turn_index": turn, "num_turns": len(turns)}
        for turn, index in enumerate(turns)
    ]


class TurnPrompts(PromptSource):
    """Multi-turn trajectories split into per-turn prompts (module docstring).

    Args:
        path: a JSONL file, one trajectory per line: ``{"messages": [...], "id": optional}`` with
            roles system/user/assistant/tool; other fields are copied onto every turn's row.
        task: or a :class:`~lit_opd.tasks.Task` whose rows are trajectories (e.g. ``ToolCalcTask``);
            its verifier grades each turn.
        num_rows, seed: trajectories drawn from ``task``.
        mode: "teacher_forcing" (a row per assistant turn) or "full" (a row per trajectory: the
            history before its first assistant turn; ``answer`` is the final turn).
    """

    def __init__(self, path: str | None = None, task: Task | None = None, num_rows: int = 1000, seed: int = 0,
                 mode: Literal["teacher_forcing", "full"] = "teacher_forcing") -> None:
        if (path is None) == (task is None):
            raise ValueError("TurnPrompts needs exactly one of path (a JSONL file of trajectories) or task")
        if mode not in ("teacher_forcing", "full"):
            raise ValueError(f"TurnPrompts.mode={mode!r}: use 'teacher_forcing' or 'full'")
        if num_rows < 1:
            raise ValueError(f"TurnPrompts.num_rows must be >= 1, got {num_rows}")
        self.path, self.task, self.num_rows, self.seed, self.mode = path, task, num_rows, seed, mode

    def trajectories(self) -> list[tuple[str, dict]]:
        """(where, trajectory) pairs, in file or task order."""
        if self.task is not None:
            rows = self.task.make_rows(self.num_rows, self.seed)
            return [(f"TurnPrompts task row {i}", row) for i, row in enumerate(rows)]
        path = Path(self.path)
        if not path.is_file():
            raise FileNotFoundError(f"TurnPrompts.path={self.path!r} does not exist; point it at a .jsonl "
                                    "file of trajectories")
        out = []
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    out.append((f"{self.path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.path}:{lineno}: not valid JSON ({err.msg})") from err
        if not out:
            raise ValueError(f"TurnPrompts.path={self.path!r} holds no trajectories")
        return out

    def load(self) -> list[dict]:
        rows = []
        for index, (where, trajectory) in enumerate(self.trajectories()):
            if not isinstance(trajectory, dict):
                raise ValueError(f"{where}: expected an object with 'messages', got "
                                 f"{type(trajectory).__name__}")
            extra = {k: v for k, v in trajectory.items() if k not in (*TURN_FIELDS, "id")}
            turns = split_turns(trajectory.get("messages"), trajectory.get("id", index), where, extra)
            if self.mode == "full":  # the first turn's history; the episode is graded on its last turn
                turns = [{**turns[0], "answer": turns[-1]["answer"]}]
            rows += turns
        return rows

    def verify(self, completion: str, answer: str | None) -> bool:
        if self.task is not None:
            return self.task.verify(completion, answer)
        return super().verify(completion, answer)


def row_groups(records: list[dict], group_field: str, split: str) -> list[list[int]]:
    """Indices of ``records`` (each with its source ``row``, as PromptTokenizer encodes them) grouped by
    ``row[group_field]``, groups in order of first appearance, each group's indices ordered by the
    row's ``turn_index`` (when rows have one) and then by position."""
    groups: dict[object, list[int]] = {}
    for index, record in enumerate(records):
        row = record["row"]
        if group_field not in row:
            raise ValueError(f"RolloutDataModule.group_field={group_field!r}: {split} row {index} has no "
                             f"{group_field!r} field; give every row one (TurnPrompts does) or set "
                             "group_field: null")
        groups.setdefault(row[group_field], []).append(index)
    turn = [record["row"].get("turn_index", 0) for record in records]
    return [sorted(members, key=lambda i: (turn[i], i)) for members in groups.values()]
