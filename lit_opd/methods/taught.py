"""TaughtModule: what every method with a teacher shares — the teacher's lifecycle in one place.

The teacher is checked once at setup (``connect``: a remote teacher that is down fails there,
naming its URL), placed on the training device with the frozen helpers (π_ref), its request
counters are logged every step and kept in checkpoints, and its identity is recorded so that a
resume with another teacher is refused unless asked for. OPDModule (and the methods built on it)
and OmniOPDModule subclass it.
"""

from __future__ import annotations

import copy

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_opd import checkpoints
from lit_opd.errors import SettingError
from lit_opd.methods.base import PolicyModule, default_optimizer
from lit_opd.models import ModelSpec, freeze, load_causal_lm
from lit_opd.objectives.components import Objective
from lit_opd.teachers.base import Teacher
from lit_opd.types import RolloutBatch


class TaughtModule(PolicyModule):
    """A :class:`PolicyModule` with a teacher, an objective and optional frozen helpers.

    Args:
        student, tokenizer, optimizer, scheduler: see :class:`PolicyModule`.
        teacher: the judge; never trained, never checkpointed (its identity is).
        objective: the method's loss component; its settings are recorded in checkpoints.
        allow_teacher_change: resume from a checkpoint made with another teacher.
        allow_settings_change: resume from a checkpoint made with another student spec or another
            objective (class or any setting); see :class:`PolicyModule`. A setting the checkpoint
            does not record (added to lit_opd since) counts as unchanged at its default.
    """

    def __init__(
        self,
        student: ModelSpec | str | nn.Module,
        teacher: Teacher,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        objective: Objective | None = None,
        allow_teacher_change: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        allow_settings_change: bool = False,
    ) -> None:
        super().__init__(student, tokenizer, optimizer, scheduler,
                         allow_settings_change=allow_settings_change)
        self.teacher, self.objective = teacher, objective
        self.allow_teacher_change = allow_teacher_change
        # Frozen helpers live in a plain dict so they are not registered: never optimised or saved.
        self._frozen: dict[str, nn.Module] = {}

    def freeze_reference(self, reference: ModelSpec | str | None) -> None:
        """π_ref: the model at ``reference``, or a frozen copy of the student's initial weights."""
        ref = load_causal_lm(reference) if reference is not None else copy.deepcopy(self.student)
        self._frozen["reference"] = freeze(ref)

    @property
    def reference(self) -> nn.Module | None:
        """π_ref (frozen), or None when the method's objective uses none."""
        return self._frozen.get("reference")

    # ----- the teacher's lifecycle ----------------------------------------------------------
    def setup(self, stage: str) -> None:
        # A remote teacher that is down fails here, naming its URL, before any rollout is spent.
        self.teacher.connect()

    def _place_frozen(self) -> None:
        self.teacher.to(self.device)
        for model in self._frozen.values():
            model.to(self.device)

    def on_fit_start(self) -> None:
        self._place_frozen()

    def on_validation_start(self) -> None:
        self._place_frozen()

    def on_test_start(self) -> None:
        self._place_frozen()

    def log_rollout(self, batch: RolloutBatch, metrics: dict) -> None:
        super().log_rollout(batch, metrics)
        self.log_teacher_stats(batch)

    def log_teacher_stats(self, batch: RolloutBatch) -> None:
        """The teacher's running request counters (remote teachers), as ``teacher/<key>``."""
        stats = self.teacher.stats()
        if stats:
            self.log_dict({f"teacher/{k}": float(v) for k, v in stats.items()},
                          batch_size=batch.completion_ids_BT.shape[0])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lit_opd"]["teacher"] = self.teacher.identity()
        checkpoint["lit_opd"]["objective"] = self.objective.settings() if self.objective is not None else None
        checkpoint["lit_opd"]["teacher_stats"] = self.teacher.stats()

    def settings_changes(self, info: dict) -> list[str]:
        """The student spec's differences (:class:`PolicyModule`) and the objective's: its class, and
        each setting (one the checkpoint lacks compared at its default)."""
        current = self.objective.settings() if self.objective is not None else None
        defaults = checkpoints.objective_defaults(self.objective) if self.objective is not None else {}
        return checkpoints.settings_changes(info, self._student_identity(), current, defaults,
                                            compare_objective="objective" in info)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # checksums, architecture, student and objective settings
        info = checkpoint.get("lit_opd", {})
        self.teacher.restore_stats(info.get("teacher_stats", {}))
        saved, current = info.get("teacher"), self.teacher.identity()
        if saved is not None and saved != current and not self.allow_teacher_change:
            raise SettingError(self.teacher_change_message(saved, current))

    def teacher_change_message(self, saved: dict, current: dict) -> str:
        """The error for a resume whose teacher identity differs from the checkpoint's."""
        return (
            f"This checkpoint was trained with teacher {saved}, but the configured teacher is {current}. "
            "Resume with the same teacher, or set allow_teacher_change: true to continue with the new one "
            "on purpose."
        )
