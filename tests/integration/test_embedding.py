"""Embedding lit_opd in a user's own Lightning project: their Trainer, callbacks and logger.

Nothing here goes through the CLI; a user builds the module and DataModule in Python.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_opd import Divergence, HFTeacher, OPDModule, RolloutBatch, RolloutDataModule, SamplingParams, TaskPrompts
from lit_opd.tasks import AdditionTask
from tests.helpers import make_trainer

pytestmark = pytest.mark.integration


class CountBatches(L.Callback):
    """A user's own callback: sees every training batch the method sees."""

    def __init__(self) -> None:
        self.batches: list[RolloutBatch] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.batches.append(batch)
        self.losses.append(float(outputs["loss"]))


def _data(batch_size: int = 4) -> RolloutDataModule:
    return RolloutDataModule(
        TaskPrompts(AdditionTask(1, 2), num_rows=32), val_size=0, batch_size=batch_size,
        sampling=SamplingParams(max_new_tokens=6),
    )


def _trainer(root: Path, max_steps: int, **kwargs) -> L.Trainer:  # noqa: ANN003
    return make_trainer(root, max_steps, **{"logger": None, **kwargs})


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_user_trainer_callback_and_logger(tmp_path, student_dir, teacher_dir):
    teacher = HFTeacher(teacher_dir)
    module = OPDModule(student_dir, teacher, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    student_before, teacher_before = _params(module.student), _params(teacher.model)
    counter = CountBatches()
    logger = CSVLogger(tmp_path, name="user_logs")
    trainer = _trainer(tmp_path, 4, callbacks=[counter], logger=logger, log_every_n_steps=1)

    trainer.fit(module, _data())

    assert trainer.global_step == 4
    # the user's callback ran on every step and received on-policy RolloutBatches
    assert len(counter.batches) == 4
    for batch in counter.batches:
        assert isinstance(batch, RolloutBatch)
        assert batch.source == "student"
        assert batch.completion_ids_BT.shape[0] == 4 and 1 <= batch.completion_ids_BT.shape[1] <= 6
        assert batch.sampler_logp_BT is not None
    assert all(torch.isfinite(torch.tensor(counter.losses)))

    # the user's logger got a train/loss row per step
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert [float(r["train/loss"]) for r in rows] == pytest.approx(counter.losses, rel=1e-5)

    # the student trained; the teacher is frozen, unchanged and outside the optimizer
    moved = [k for k, v in module.student.named_parameters() if not torch.equal(v, student_before[k])]
    assert moved, "no student parameter changed"
    for name, value in teacher.model.named_parameters():
        assert not value.requires_grad, name
        assert torch.equal(value, teacher_before[name]), name
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.student.parameters()}
    assert optimized.isdisjoint(id(p) for p in teacher.model.parameters())
    assert all(k.startswith("student.") for k in module.state_dict() if not k.startswith("val_"))


def test_self_distillation_has_zero_loss(tmp_path, student_dir):
    """Teacher == student (same weights): every divergence is zero at the first step."""
    module = OPDModule(student_dir, HFTeacher(student_dir), objective=Divergence(kind="jsd", beta=0.5))
    counter = CountBatches()
    trainer = _trainer(tmp_path, 1, callbacks=[counter], logger=False)
    trainer.fit(module, _data(batch_size=8))
    assert counter.batches[0].num_tokens > 0
    assert abs(counter.losses[0]) < 1e-6
    assert abs(float(trainer.callback_metrics["train/teacher_kl"])) < 1e-5
