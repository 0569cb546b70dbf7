"""Where prompts come from: a JSONL file, a Python list, or a built-in task.

Each source yields rows ``{"prompt": str}`` or ``{"messages": [...]}``, with an optional
``"answer"``, and knows how to verify a completion against that answer.
"""

from __future__ import annotations

import abc
import codecs
import json
from pathlib import Path

from lit_opd.tasks.base import Task


class PromptSource(abc.ABC):
    """A list of prompt rows plus a verifier."""

    @abc.abstractmethod
    def load(self) -> list[dict]:
        """All rows, in a fixed order."""

    def verify(self, completion: str, answer: str | None) -> bool:
        """Exact match after stripping whitespace; tasks override this."""
        return answer is not None and completion.strip() == answer.strip()

    def location(self, index: int) -> str | None:
        """Where row ``index`` of the last :meth:`load` comes from (e.g. ``prompts.jsonl:12``), for
        messages about that row; None when its index says it all."""
        return None

    def row_name(self, index: int, split: str) -> str:
        """Row ``index`` as messages name it: "training row 3", plus :meth:`location` when known."""
        where = self.location(index)
        return f"{split} row {index}" + (f" ({where})" if where else "")


def check_row(row: dict, where: str) -> dict:
    """A row needs a string ``prompt`` or a list ``messages``; say which row is wrong and why."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'prompt' or 'messages', got {type(row).__name__}")
    if isinstance(row.get("prompt"), str):
        pass
    elif isinstance(row.get("messages"), list) and row["messages"]:
        pass
    else:
        raise ValueError(
            f"{where}: a row needs a string 'prompt' or a non-empty list 'messages'; got keys {sorted(row)}"
        )
    if row.get("answer") is not None and not isinstance(row["answer"], str):
        raise ValueError(f"{where}: 'answer' must be a string, got {type(row['answer']).__name__}")
    return row


class JsonlPrompts(PromptSource):
    """One JSON object per line: ``{"prompt": ...}`` or ``{"messages": [...]}``, optional ``"answer"``."""

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
                raise ValueError(f"{self.path}:{lineno}: not valid JSON ({err.msg})") from err
            rows.append(check_row(row, f"{self.path}:{lineno}"))
            self._lines.append(lineno)
        if not rows:
            raise ValueError(
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
        raise IsADirectoryError(f"{setting}={path!r} is a directory, not a file; point it at a .jsonl file")
    if not file.exists():
        raise FileNotFoundError(f"{setting}={path!r} does not exist; point it at a .jsonl file")
    try:
        data = file.read_bytes()
    except PermissionError as err:
        raise PermissionError(f"{setting}={path!r} cannot be read: permission denied; make it readable "
                              "(e.g. chmod a+r) or point at a copy you can read") from err
    except OSError as err:
        raise OSError(f"{setting}={path!r} cannot be read: {err.strerror or err}") from err
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in data:
        raise ValueError(f"{setting}={path!r} is UTF-16 text (or binary), not UTF-8; save it as UTF-8 "
                         "(e.g. iconv -f UTF-16 -t UTF-8)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        lineno = data[: err.start].count(b"\n") + 1
        raise ValueError(
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
            raise ValueError("ListPrompts.rows is empty")

    def load(self) -> list[dict]:
        return list(self.rows)


class TaskPrompts(PromptSource):
    """``num_rows`` rows generated by a :class:`~lit_opd.tasks.Task` from ``seed``; its verifier."""

    def __init__(self, task: Task, num_rows: int = 1000, seed: int = 0) -> None:
        if num_rows < 1:
            raise ValueError(f"TaskPrompts.num_rows must be >= 1, got {num_rows}")
        self.task = task
        self.num_rows = num_rows
        self.seed = seed

    def load(self) -> list[dict]:
        return self.task.make_rows(self.num_rows, self.seed)

    def verify(self, completion: str, answer: str | None) -> bool:
        return self.task.verify(completion, answer)
