"""The task protocol: rows of prompt + reference answer, and a verifier for completions."""

from __future__ import annotations

import abc


class Task(abc.ABC):
    """A verifiable task. Rows are dicts with ``prompt`` (or chat ``messages``) and ``answer``.

    Subclasses are constructed from YAML (``class_path``), so keep arguments typed and simple.
    """

    @abc.abstractmethod
    def make_rows(self, num_rows: int, seed: int) -> list[dict]:
        """``num_rows`` rows drawn from ``seed``; the same (num_rows, seed) gives the same rows."""

    @abc.abstractmethod
    def verify(self, completion: str, answer: str | None) -> bool:
        """True when ``completion`` (decoded, special tokens removed) solves the row."""
