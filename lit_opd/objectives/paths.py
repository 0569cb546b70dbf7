"""The one place that chooses between the logits path and the memory-lean hidden-state path.

The lean path applies when the objective has ``lean_options`` (a ``chunk_size``, full vocabulary),
the student's logits are a plain linear map of its last hidden state, and the teacher can return
hidden states (:meth:`lit_opd.teachers.Teacher.score_hidden`). Otherwise both models give logits.

Student and teacher may pad their embedding matrices to different sizes over one tokenizer: both
paths compare them over the ids both have (``divergences.common_vocab``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from lit_opd.errors import SettingError
from lit_opd.models import completion_hidden, completion_logits, plain_head
from lit_opd.objectives import divergences as D
from lit_opd.objectives.components import Objective, TokenTerms
from lit_opd.objectives.lean import hidden_divergence
from lit_opd.teachers.base import Teacher
from lit_opd.types import RolloutBatch, TeacherOutput


@torch.no_grad()
def score_teacher(
    teacher: Teacher, student: nn.Module, batch: RolloutBatch, objective: Objective
) -> TeacherOutput:
    """The teacher's judgement of ``batch``: hidden states where the lean path applies, else ``score``."""
    if objective.lean_options() is not None and plain_head(student):
        lean = teacher.score_hidden(batch)
        if lean is not None:
            return lean
    return teacher.score(batch)


def token_terms(
    student: nn.Module, batch: RolloutBatch, teacher_out: TeacherOutput, objective: Objective
) -> TokenTerms:
    """The student's forward on ``batch`` and the per-token terms every objective reads."""
    if teacher_out.hidden_BTH is not None:  # memory-lean: no [B, T, V] tensor for either model
        options = objective.lean_options()
        student_VH, teacher_VH = student.get_output_embeddings().weight, teacher_out.head_weight_VH
        V = min(student_VH.shape[0], teacher_VH.shape[0])  # padded vocabularies: the ids both have
        # Sliced only when padded: a slice's backward would add a second [V, H] gradient buffer.
        student_VH, teacher_VH = (w if w.shape[0] == V else w[:V] for w in (student_VH, teacher_VH))
        lean = hidden_divergence(
            completion_hidden(student, batch), student_VH, teacher_out.hidden_BTH, teacher_VH,
            batch.completion_ids_BT, batch.loss_mask_BT, **options,
        )
        fused = lean.loss if options["kind"] is not None else None
        return TokenTerms(lean.student_logp_BT, lean.teacher_logp_BT, lean.entropy_BT, fused_loss=fused)
    logits_BTV = completion_logits(student, batch)
    if teacher_out.logits_BTV is not None and teacher_out.logits_BTV.shape != logits_BTV.shape:
        # padded vocabularies: the ids both have
        logits_BTV, teacher_logits_BTV = D.common_vocab(logits_BTV, teacher_out.logits_BTV)
        teacher_out = replace(teacher_out, logits_BTV=teacher_logits_BTV)
    return TokenTerms(
        student_logp_BT=D.token_logprobs(logits_BTV, batch.completion_ids_BT),
        teacher_logp_BT=teacher_token_logp(batch, teacher_out),
        entropy_BT=D.entropy(logits_BTV.detach()),
        student_logits_BTV=logits_BTV,
    )


def teacher_token_logp(batch: RolloutBatch, out: TeacherOutput) -> torch.Tensor:
    """The teacher's log-prob of each completion token: given, or read off its full logits."""
    if out.token_logp_BT is not None:
        return out.token_logp_BT
    if out.topk_logp_BTK is not None and out.logits_BTV is None:
        raise SettingError(
            "this objective needs the teacher's log-prob of every sampled token, but the teacher returned "
            "only its top-k; use a teacher that also returns token_logp_BT (or full logits)"
        )
    return D.token_logprobs(out.logits_BTV, batch.completion_ids_BT)


def answered_only(batch: RolloutBatch, teacher_out: TeacherOutput) -> RolloutBatch:
    """``batch`` with the rows the teacher gave no answer for (``answered_B`` False) out of the loss
    mask: their filler values never reach the loss, and the run goes on without them."""
    if teacher_out.answered_B is None:
        return batch
    answered_B1 = teacher_out.answered_B.to(batch.loss_mask_BT.device).bool().unsqueeze(-1)
    return replace(batch, loss_mask_BT=batch.loss_mask_BT & answered_B1)
