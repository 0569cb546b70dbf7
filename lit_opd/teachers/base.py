"""The teacher protocol: one small interface, a declared capability, no weights in checkpoints."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from transformers import PreTrainedTokenizerBase

from lit_opd.types import RolloutBatch, TeacherCapability, TeacherOutput


class Teacher(abc.ABC):
    """Judges a student's completions.

    A teacher is deliberately *not* an ``nn.Module``: assigned to a LightningModule it is not
    registered as a submodule, so its weights never reach the optimizer or a checkpoint. Methods
    move it with :meth:`to` and record :meth:`identity` in the checkpoint instead.
    """

    capability: ClassVar[TeacherCapability]
    tokenizer: PreTrainedTokenizerBase | None = None

    @abc.abstractmethod
    def score(self, batch: RolloutBatch) -> TeacherOutput:
        """Judge ``batch.completion_ids_BT`` given ``batch.prompt_ids_BP`` (no gradients)."""

    @abc.abstractmethod
    def identity(self) -> dict:
        """JSON-able description that says whether a resumed run has the same teacher."""

    def to(self, device: torch.device | str) -> Teacher:  # noqa: ARG002 - remote teachers ignore it
        return self


def check_capability(teacher: Teacher, needed: TeacherCapability, method: str, setting: str) -> None:
    """Fail at construction, not at step 300, when a method needs more than the teacher gives."""
    if teacher.capability < needed:
        raise ValueError(
            f"{method} with {setting} needs a teacher with capability {needed.name}, but "
            f"{type(teacher).__name__} provides {teacher.capability.name}. Use a teacher that returns "
            f"{needed.name} (e.g. HFTeacher) or a method/setting that works from {teacher.capability.name}."
        )
