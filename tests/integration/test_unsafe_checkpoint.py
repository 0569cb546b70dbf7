"""A checkpoint that hides code is refused by ``export``, ``fit --ckpt_path`` and ``validate
--ckpt_path`` with one line, and the code never runs.

The hostile file is a real checkpoint from a tiny fit plus one extra entry whose ``__reduce__`` is
``os.system("touch <marker>")``: a ``torch.load(..., weights_only=False)`` of it creates the marker.
lit_opd's own checkpoints hold only tensors and plain data, so they load with ``weights_only=True``.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import torch

from lit_opd.errors import user_message
from tests.integration.cli import one_error_line, run_main
from tests.integration.scripts.procs import tiny_opd_config

pytestmark = pytest.mark.integration

REFUSAL = ("holds Python objects other than tensors and plain data (first found: posix.system), which could "
           "run code when loaded; nothing from it was run or loaded. Use a checkpoint written by lit_opd or "
           "by a source you trust.")


class RunsCode:
    """Unpickling this runs ``touch <marker>``: what a hostile checkpoint would hide."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle's protocol
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def hostile_copy(good: Path, dst: Path, marker: Path) -> Path:
    checkpoint = torch.load(good, map_location="cpu", weights_only=True)
    checkpoint["extra"] = RunsCode(marker)
    torch.save(checkpoint, dst)
    return dst


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, student_dir, teacher_dir) -> tuple[Path, Path]:
    """One real 2-step fit through the CLI: its config and its ``last.ckpt``."""
    root = tmp_path_factory.mktemp("unsafe_ckpt")
    config = tiny_opd_config(root / "tiny.yaml", root / "run", student_dir, teacher_dir, max_steps=2)
    with pytest.MonkeyPatch.context() as mp:
        run_main(["fit", "--config", str(config)], mp)
    return config, root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture
def hostile(tiny_run, tmp_path) -> tuple[Path, Path]:
    """The fit's checkpoint plus code that would touch a marker file: (checkpoint, marker)."""
    marker = tmp_path / "code_ran"
    return hostile_copy(tiny_run[1], tmp_path / "hostile.ckpt", marker), marker


def test_lit_opd_checkpoints_load_weights_only_and_the_payload_is_live(tiny_run, tmp_path):
    """What the refusal relies on (a real checkpoint loads safely), and that the tests below are not
    vacuous (an unsafe load of the hostile copy does run its code)."""
    checkpoint = torch.load(tiny_run[1], map_location="cpu", weights_only=True)
    assert checkpoint["lit_opd"]["student_config"] and checkpoint["state_dict"]
    marker = tmp_path / "unsafe_load_ran_it"
    torch.load(hostile_copy(tiny_run[1], tmp_path / "h.ckpt", marker), map_location="cpu", weights_only=False)
    assert marker.exists()


def test_export_refuses_it_and_writes_nothing(hostile, tmp_path, monkeypatch, capsys):
    bad, marker = hostile
    out = tmp_path / "exported"
    with pytest.raises(SystemExit) as exit_:
        run_main(["export", "--ckpt_path", str(bad), "--out", str(out)], monkeypatch)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert one_error_line(err) == f"error: export --ckpt_path '{bad}' {REFUSAL}"
    assert err.strip() == one_error_line(err)  # no usage text either
    assert not marker.exists()
    assert not out.exists()


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_resume_and_validate_refuse_it_in_one_line(command, tiny_run, hostile, monkeypatch, capsys):
    bad, marker = hostile
    with pytest.raises(SystemExit) as exit_:
        run_main([command, "--config", str(tiny_run[0]), "--ckpt_path", str(bad)], monkeypatch)
    assert exit_.value.code == 1
    assert one_error_line(capsys.readouterr().err) == f"error: ckpt_path='{bad}' {REFUSAL}"
    assert not marker.exists()


def test_a_refusal_outside_lightning_does_not_blame_ckpt_path(hostile):
    """The same refusal from another caller of torch.load (here: this test; in a run: a callback's
    own file) is still one message, but it does not name the run's ckpt_path."""
    bad, marker = hostile
    with pytest.raises(Exception) as refused:  # noqa: PT011 - torch's UnpicklingError, checked below
        torch.load(bad, map_location="cpu", weights_only=True)
    assert user_message(refused.value) == f"A file that torch.load read with weights_only=True {REFUSAL}"
    assert not marker.exists()
