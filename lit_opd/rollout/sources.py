"""Where prompts come from: a JSONL file, a Python list, or a built-in task (a Hugging Face
``datasets`` data set: :mod:`lit_opd.rollout.hf_datasets`).

Each source yields rows ``{"prompt": str}`` or ``{"messages": [...]}``, with an optional
``"answer"``, and knows how to verify a completion against that answer. Rows in the conversational
format (``messages`` ending with the assistant's turn) and TRL's prompt-completion format
(``{"prompt": ..., "completion": ...}``) carry their reference answer in that turn:
:func:`split_reference` takes it out of the prompt.
"""

from __future__ import annotations

import abc
import codecs
import json
from pathlib import Path

from lit_opd.errors import MissingFile, SettingError, UnusablePath
from lit_opd.rollout.verifiers import ExactMatch
from lit_opd.tasks.base import Task


class PromptSource(abc.ABC):
    """A list of prompt rows plus a verifier."""

    @abc.abstractmethod
    def load(self) -> list[dict]:
        """All rows, in a fixed order."""

    def verify(self, completion: str, answer: str | None) -> bool:
        """Exact match after stripping whitespace; tasks override this (and the datamodule's
        ``verifier`` setting replaces it)."""
        return bool(ExactMatch()(completion, answer, {}))

    def location(self, index: int) -> str | None:
        """Where row ``index`` of the last :meth:`load` comes from (e.g. ``prompts.jsonl:12``), for
        messages about that row; None when its index says it all."""
        return None

    def row_name(self, index: int, split: str) -> str:
        """Row ``index`` as messages name it: "training row 3", plus :meth:`location` when known."""
        where = self.location(index)
        return f"{split} row {index}" + (f" ({where})" if where else "")


def check_row(row: dict, where: str) -> dict:
    """A row needs a string ``prompt`` or a list ``messages`` (TRL's conversational prompt, a list
    ``prompt``, counts as messages); say which row is wrong and why."""
    if not isinstance(row, dict):
        raise SettingError(f"{where}: expected an object with 'prompt' or 'messages', got {type(row).__name__}")
    if isinstance(row.get("prompt"), str):
        pass
    elif isinstance(row.get("prompt"), list) and row["prompt"] and "messages" not in row:
        pass
    elif isinstance(row.get("messages"), list) and row["messages"]:
        pass
    else:
        raise SettingError(
            f"{where}: a row needs a string 'prompt' or a non-empty list 'messages'; got keys {sorted(row)}"
        )
    if row.get("answer") is not None and not isinstance(row["answer"], str):
        raise SettingError(f"{where}: 'answer' must be a string, got {type(row['answer']).__name__}")
    return row


def split_reference(row: dict, where: str) -> tuple[dict, str | None]:
    """(the row as a prompt, its reference completion: SFT's and GKD's off-policy target).

    A conversational row's ``messages`` that end with an assistant turn, or TRL's prompt-completion
    row (``prompt`` a string or messages, ``completion`` a string or one assistant message), hold the
    reference in that turn: it leaves the prompt, and becomes the row's ``answer`` unless the row has
    one. A row with both keeps its ``answer`` for the verifier (e.g. a final number) while the
    assistant turn stays the training target. Other rows: the reference is their ``answer``."""
    if "completion" in row:
        prompt = row.get("prompt")
        rest = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
        if prompt is not None:  # else the row's own messages are the prompt
            rest.update({"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt})
        return _with_reference(rest, _reply_text(row["completion"], where, "'completion'"))
    messages = row.get("messages")
    if isinstance(row.get("prompt"), list) and messages is None:  # TRL's conversational prompt-only row
        rest = {k: v for k, v in row.items() if k != "prompt"}
        return split_reference({**rest, "messages": row["prompt"]}, where)
    if not (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
            and messages[-1].get("role") == "assistant"):
        return row, row.get("answer")
    if len(messages) == 1:
        raise SettingError(f"{where}: 'messages' holds only an assistant turn, so there is no prompt; add the "
                         "user's turn before it")
    reply = _reply_text(messages[-1], where, "the final assistant turn")
    return _with_reference({**row, "messages": messages[:-1]}, reply)


def _with_reference(row: dict, reply: str) -> tuple[dict, str]:
    if row.get("answer") is None:
        row["answer"] = reply
    return row, reply


def _reply_text(reply: object, where: str, what: str) -> str:
    """The text of a reference reply: a string, an assistant message, or a list of one."""
    if isinstance(reply, list) and len(reply) == 1:
        reply = reply[0]
    if isinstance(reply, dict):
        reply = reply.get("content")
    if not isinstance(reply, str) or not reply.strip():
        raise SettingError(f"{where}: {what} must be a non-empty text (the reference answer); "
                         f"got {reply!r:.80}")
    return reply


class JsonlPrompts(PromptSource):
    """One JSON object per line: ``{"prompt": ...}`` or ``{"messages": [...]}``, optional ``"answer"``;
    conversational rows may end with the assistant's reference turn (:func:`split_reference`)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> list[dict]:
        rows, self._lines = [], []
        for lineno, line in read_lines(self.path, "JsonlPrompts.path"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SettingError(f"{self.path}:{lineno}: not valid JSON ({err.msg})") from err
            rows.append(check_row(row, f"{self.path}:{lineno}"))
            self._lines.append(lineno)
        if not rows:
            raise SettingError(
                f"JsonlPrompts.path={self.path!r} holds no rows; write one JSON object per line, e.g. "
                '{"prompt": "2+2=", "answer": "4"}'
            )
        return rows

    def location(self, index: int) -> str | None:
        lines = getattr(self, "_lines", [])
        return f"{self.path}:{lines[index]}" if index < len(lines) else None


def read_lines(path: str, setting: str) -> list[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 text file (a UTF-8 byte-order mark is fine); a file that is
    missing, a directory, unreadable or in another encoding is refused in one line naming ``setting``."""
    file = Path(path)
    if file.is_dir():
        raise UnusablePath(f"{setting}={path!r} is a directory, not a file; point it at a .jsonl file")
    if not file.exists():
        raise MissingFile(f"{setting}={path!r} does not exist; point it at a .jsonl file")
    try:
        data = file.read_bytes()
    except PermissionError as err:
        raise UnusablePath(f"{setting}={path!r} cannot be read: permission denied; make it readable "
                              "(e.g. chmod a+r) or point at a copy you can read") from err
    except OSError as err:
        raise UnusablePath(f"{setting}={path!r} cannot be read: {err.strerror or err}") from err
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in data:
        raise SettingError(f"{setting}={path!r} is UTF-16 text (or binary), not UTF-8; save it as UTF-8 "
                         "(e.g. iconv -f UTF-16 -t UTF-8)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        lineno = data[: err.start].count(b"\n") + 1
        raise SettingError(
            f"{setting}={path!r} is not UTF-8 text: line {lineno} holds byte 0x{data[err.start]:02x}; save "
            "the file as UTF-8 (e.g. iconv -f latin1 -t UTF-8)"
        ) from None
    # Line ends as text-mode open() reads them (\n, \r\n, \r), and no others: a JSON string may hold U+2028.
    return list(enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1))


class ListPrompts(PromptSource):
    """Rows given in Python or inline in YAML."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = [check_row(r, f"ListPrompts.rows[{i}]") for i, r in enumerate(rows)]
        if not self.rows:
            raise SettingError("ListPrompts.rows is empty")

    def load(self) -> list[dict]:
        return list(self.rows)


class TaskPrompts(PromptSource):
    """``num_rows`` rows generated by a :class:`~lit_opd.tasks.Task` from ``seed``; its verifier."""

    def __init__(self, task: Task, num_rows: int = 1000, seed: int = 0) -> None:
        if num_rows < 1:
            raise SettingError(f"TaskPrompts.num_rows must be >= 1, got {num_rows}")
        self.task = task
        self.num_rows = num_rows
        self.seed = seed

    def load(self) -> list[dict]:
        return self.task.make_rows(self.num_rows, self.seed)

    def verify(self, completion: str, answer: str | None) -> bool:
        return self.task.verify(completion, answer)
