"""The teacher protocol: one small interface, a declared capability, no weights in checkpoints.

Every ability a method or callback may use is declared here with a default, so callers ask the
protocol and never probe a teacher's attributes: ``score`` (required), ``identity`` (required),
``to``, ``score_hidden`` (the memory-lean loss), ``generator`` (a model that samples token ids, for
sequence-level KD), ``scoring_model`` (a model whose logits are ``score``'s distribution, for
calibration), ``generate_text`` (text continuations, for text-only methods), ``connect`` (fail
at setup, naming the URL, when a remote teacher is unreachable) and ``stats`` (request counters a
method logs every step). A group of teachers (an ensemble, a teacher per row) implements the same
protocol.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_opd.errors import SettingError
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
        """Place the teacher's weights on the training device (remote teachers: nothing to do)."""
        return self

    def connect(self) -> None:
        """Check, once at setup, that the teacher can answer; raise one clear error (naming the URL
        for a remote teacher) if it cannot. Local teachers: nothing to check."""

    def stats(self) -> dict[str, float]:
        """Running counters since construction (requests, retries, failures, tokens), logged by the
        method as ``teacher/<key>`` every step. Local teachers: none."""
        return {}

    def restore_stats(self, stats: dict[str, float]) -> None:
        """Counters saved in a checkpoint (``stats()`` at save time), so a resumed run keeps counting
        (and spending a remote teacher's budget) where it stopped. Local teachers: nothing to do."""

    def score_hidden(self, batch: RolloutBatch) -> TeacherOutput | None:  # noqa: ARG002
        """Last hidden states and output weight instead of logits (the memory-lean loss path), or
        None when this teacher cannot give them; the method then calls :meth:`score`."""
        return None

    def generator(self) -> nn.Module | None:
        """A local causal LM that samples completions as token ids in the student's vocabulary
        (sequence-level KD's teacher rollouts), or None."""
        return None

    def scoring_model(self) -> nn.Module | None:
        """A local causal LM whose logits give exactly the distribution :meth:`score` returns (what
        calibration teacher-forces), or None."""
        return None

    def generates_text(self) -> bool:
        """Whether :meth:`generate_text` is implemented (every local teacher and APITeacher; not a
        log-prob server). Methods that compare text check it at construction."""
        return type(self).generate_text is not Teacher.generate_text

    def generate_text(
        self, prompts: Sequence[str], max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
        seed: int = 0,
    ) -> list[list[str | None]]:
        """``num_samples`` text continuations of each prompt (None where the teacher gave no answer),
        for methods that compare text. Teachers that cannot generate text raise."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot generate text; use a teacher that can (e.g. HFTeacher)"
        )


def check_capability(teacher: Teacher, needed: TeacherCapability, method: str, setting: str) -> None:
    """Fail at construction, not at step 300, when a method needs more than the teacher gives."""
    if teacher.capability < needed:
        raise SettingError(
            f"{method} with {setting} needs a teacher with capability {needed.name}, but "
            f"{type(teacher).__name__} provides {teacher.capability.name}. Use a teacher that returns "
            f"{needed.name} (e.g. HFTeacher) or a method/setting that works from {teacher.capability.name}."
        )
