"""``--ckpt_path last`` resumes the same run in the folder it started in, from a config without a
pinned checkpoint ``dirpath``; with nothing to resume it stops in one line instead of retraining."""

from __future__ import annotations

import csv

import pytest
import torch

from tests.integration.cli import refused, run_main

pytestmark = pytest.mark.integration


def tiny_fit_args(student_dir: str, teacher_dir: str, root, *extra: str) -> list[str]:  # noqa: ANN001
    """configs/tiny/opd.yaml (checkpoints without a dirpath: they go to the logger's version folder)."""
    return [
        "fit", "--config", "configs/tiny/opd.yaml", "--model.init_args.student", student_dir,
        "--model.init_args.teacher.init_args.model", teacher_dir, "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root), *extra,
    ]


def test_ckpt_path_last_continues_the_run_in_its_own_folder(tmp_path, student_dir, teacher_dir, monkeypatch):
    run_main(tiny_fit_args(student_dir, teacher_dir, tmp_path, "--trainer.max_steps", "2"), monkeypatch)
    checkpoints = tmp_path / "logs" / "version_0" / "checkpoints"
    first_step_2 = (checkpoints / "epoch=0-step=2.ckpt").stat().st_mtime_ns

    models = (student_dir, teacher_dir, tmp_path)
    resume = tiny_fit_args(*models, "--trainer.max_steps", "4", "--ckpt_path", "last")
    run_main(resume, monkeypatch)
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["version_0"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 4
    # Continued at step 2: the first launch's step-2 checkpoint was not written again.
    assert (checkpoints / "epoch=0-step=2.ckpt").stat().st_mtime_ns == first_step_2
    with open(tmp_path / "logs" / "version_0" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]  # both launches' rows, in one file
    assert all(r["train/loss"] for r in rows)

    fresh = tiny_fit_args(*models, "--trainer.max_steps", "1", "--new_version", "true")
    run_main(fresh, monkeypatch)
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["version_0", "version_1"]


def test_ckpt_path_last_without_a_checkpoint_stops_naming_where_it_looked(
    tmp_path, student_dir, teacher_dir, monkeypatch, capsys
):
    args = tiny_fit_args(student_dir, teacher_dir, tmp_path, "--ckpt_path", "last")
    line = refused(args, monkeypatch, capsys)
    assert str(tmp_path / "logs" / "version_0" / "checkpoints") in line
    assert "no last.ckpt" in line and "without --ckpt_path" in line
    assert not list(tmp_path.rglob("*.ckpt")), "it trained from step 0"
