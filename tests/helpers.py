"""Builders shared by tests (not fixtures, so subprocess scripts can import them too)."""

from __future__ import annotations

from pathlib import Path

from lit_opd.tiny import make_tiny_model  # noqa: F401 - re-exported for the tests


def save_tiny_model(model, tokenizer, path: str | Path) -> None:  # noqa: ANN001
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def addition_rows(n: int, seed: int = 0) -> list[dict]:
    from lit_opd.tasks import AdditionTask

    return AdditionTask(1, 2).make_rows(n, seed)
