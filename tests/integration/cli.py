"""Running ``python -m lit_opd`` in-process from a test, and reading its one-line errors."""

from __future__ import annotations

import sys

import pytest

from lit_opd.cli import main
from tests.integration.scripts.procs import REPO


def run_main(args: list[str], monkeypatch) -> None:  # noqa: ANN001
    """``python -m lit_opd ARGS`` in this process, from the repo root."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lit_opd", *args])
    main()


def one_error_line(stderr: str) -> str:
    """The single ``error:`` line, after checking there is no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def refused(args: list[str], monkeypatch, capsys) -> str:  # noqa: ANN001
    """Run the CLI expecting exit 1 and exactly one ``error:`` line, no traceback: that line."""
    with pytest.raises(SystemExit) as exit_:
        run_main(args, monkeypatch)
    assert exit_.value.code == 1
    return one_error_line(capsys.readouterr().err)


def raised(fn, *args, **kwargs) -> BaseException:  # noqa: ANN001, ANN003
    """What ``fn(*args, **kwargs)`` raises (the test fails if it raises nothing)."""
    try:
        fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - the point is to look at it
        return err
    raise AssertionError(f"{fn} did not raise")
