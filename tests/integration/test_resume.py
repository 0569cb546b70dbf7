"""Exact resume after a real crash (same losses as an unbroken run) and the teacher identity in checkpoints.

Run A trains 8 steps without a break. Run B, same config in another directory, is SIGKILLed right
after step 5 (its last checkpoint is step 4, so step 5's work is lost), then resumed with ``--ckpt_path last`` to 8
steps. B's steps 5..8 must log the same losses as A's and end with the same student weights.
The config has the GKD mix (lmbda 0.5) and crosses an epoch boundary after the resume, so the
on/off-policy draw, the rollout seeds, the data position and the optimizer state all have to be
restored for the numbers to match.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lit_opd import HFTeacher, OPDModule, RolloutDataModule, SamplingParams, TaskPrompts
from lit_opd.tasks import AdditionTask
from tests.integration.scripts.procs import finish, read_metrics, run_lit_opd, start, step_values, tiny_opd_config

pytestmark = pytest.mark.integration

KILLER = "tests.integration.scripts.callbacks.KillAtStep"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, student_dir, teacher_dir):
    """Run A (unbroken) and run B (killed after step 5, resumed from step 4)."""
    root = tmp_path_factory.mktemp("resume")
    dirs = {}
    for name in ("A", "B"):
        run_dir = root / name
        run_dir.mkdir()
        cfg = tiny_opd_config(root / f"{name}.yaml", run_dir, student_dir, teacher_dir, max_steps=8)
        dirs[name] = (run_dir, cfg)

    # A and B's first (crashing) run are independent: run them side by side.
    run_b, cfg_b = dirs["B"]
    proc_a = start(["-m", "lit_opd", "fit", "--config", str(dirs["A"][1])])
    proc_b = start(
        ["-m", "lit_opd", "fit", "--config", str(cfg_b),
         f"--trainer.callbacks+={KILLER}", "--trainer.callbacks.step", "5"]
    )
    try:
        a = finish(proc_a)
    finally:
        crashed = finish(proc_b)  # never leave B running, even when A failed
    assert a.returncode == 0, a.stderr[-3000:]
    assert crashed.returncode == -9, f"run B was not killed: rc={crashed.returncode}\n{crashed.stderr[-3000:]}"
    ckpts = run_b / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4
    # the step-4 checkpoint flushed the logger; what came after it died with the process
    assert sorted(step_values(read_metrics(run_b), "train/loss")) == [0, 1, 2, 3]

    resumed = run_lit_opd(["fit", "--config", str(cfg_b), "--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
    return {"A": dirs["A"][0], "B": run_b}


def test_resumed_run_repeats_the_unbroken_losses(runs):
    rows_a = read_metrics(runs["A"])
    # The resumed process logs into the crashed run's own folder, after its rows (no version_1).
    assert not (runs["B"] / "logs" / "version_1").exists()
    rows_b = read_metrics(runs["B"] / "logs" / "version_0")
    for key in ("train/loss", "train/teacher_kl", "rollout/len_mean"):
        a, b = step_values(rows_a, key), step_values(rows_b, key)
        assert sorted(a) == list(range(8)), f"{key}: run A logged steps {sorted(a)}"
        # CSVLogger's `step` is the global step before the update: steps 0..3 before the crash, and
        # the resumed steps 5..8 as rows 4..7.
        assert sorted(b) == list(range(8)), f"{key}: run B logged steps {sorted(b)}"
        for step in range(4, 8):
            assert b[step] == pytest.approx(a[step], abs=1e-5, rel=1e-5), (key, step, a, b)
    # The resumed window mixes on-policy (student samples of varying length) and dataset steps,
    # and the losses are not constant, so matching them means something was really restored.
    loss_a = step_values(rows_a, "train/loss")
    assert len({round(loss_a[s], 6) for s in range(4, 8)}) == 4


def test_resumed_run_ends_with_the_unbroken_weights(runs):
    final = {}
    for name, run_dir in runs.items():
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 8
        final[name] = ckpt["state_dict"]
    first = torch.load(runs["A"] / "checkpoints" / "epoch=0-step=2.ckpt", map_location="cpu", weights_only=False)
    assert final["A"].keys() == final["B"].keys()
    for key, value in final["A"].items():
        torch.testing.assert_close(final["B"][key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert any(not torch.equal(first["state_dict"][k], v) for k, v in final["A"].items()), "weights did not move"


def test_checkpoint_holds_only_the_student_and_the_teacher_identity(runs, teacher_dir):
    ckpt = torch.load(runs["A"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith("student.") for k in keys), [k for k in keys if not k.startswith("student.")]
    assert ckpt["lit_opd"]["teacher"] == HFTeacher(teacher_dir).identity()
    assert ckpt["lit_opd"]["teacher"]["path"] == teacher_dir
    # the data position is saved with the checkpoint (8 steps of 6 per epoch: epoch 1, 2 batches in)
    dm_state = ckpt[RolloutDataModule.__qualname__]
    assert dm_state == {"epoch": 1, "batches_done": 2}


def _module_and_data(student_dir: str, teacher: str, **kwargs) -> tuple[OPDModule, RolloutDataModule]:  # noqa: ANN003
    module = OPDModule(student_dir, HFTeacher(teacher), lmbda=0.5, seed=3, **kwargs)
    data = RolloutDataModule(
        TaskPrompts(AdditionTask(1, 2), num_rows=24), val_size=0, batch_size=4,
        sampling=SamplingParams(max_new_tokens=6),
    )
    return module, data


def _trainer(root: Path, max_steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=root,
    )


def test_resuming_with_another_teacher_is_refused(runs, student_dir, tmp_path):
    ckpt = runs["B"] / "checkpoints" / "epoch=0-step=4.ckpt"
    # another teacher: the student's own weights (same tokenizer, different model)
    module, data = _module_and_data(student_dir, student_dir)
    with pytest.raises(ValueError, match="allow_teacher_change") as err:
        _trainer(tmp_path, 6).fit(module, data, ckpt_path=str(ckpt))
    assert student_dir in str(err.value)

    # saying so on purpose continues the run from step 4
    module, data = _module_and_data(student_dir, student_dir, allow_teacher_change=True)
    trainer = _trainer(tmp_path, 5)
    trainer.fit(module, data, ckpt_path=str(ckpt))
    assert trainer.global_step == 5
