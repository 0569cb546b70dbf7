"""OmniOPD's loss: a bounded chunk target from the teacher's text, and a KL anchor everywhere else.

Per kept audit (a chunk of C student tokens starting at a, checked against N teacher continuations):

    π̄ = exp(mean_{t∈chunk} log π_θ(y_t))                      (detached)
    π̂ = (k_sem + α·π̄) / (N_answered + α)                      k_sem = Σ_j φ(chunk, continuation_j)

and for one sequence

    L = −Σ_chunks π̂ · Σ_{t∈chunk} log π_θ(y_t)  +  β · Σ_{t∉chunks} KL(π_ref ‖ π_θ)_t

summed over the sequence's tokens, then averaged over sequences ("seq_sum"; "token_mean" divides
the batch total by its number of loss-mask tokens instead). π_ref is the frozen initial student.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from lit_opd.errors import SettingError
from lit_opd.methods.omni_opd.similarity import Similarity, resolve_similarity
from lit_opd.objectives import divergences as D
from lit_opd.objectives.components import Objective
from lit_opd.types import RolloutBatch, TeacherCapability

REDUCTIONS = ("seq_sum", "token_mean")
BASELINES = ("none", "batch", "prior")


@dataclass
class AnchorTerms:
    """The student's forward on a batch, and the reference's logits for the anchor.

    Fields:
        student_logp_BT: log π_θ of the completion tokens (differentiable).
        student_logits_BTV: the student's logits (differentiable).
        reference_logits_BTV: π_ref's logits (no grad).
        entropy_BT: the student's exact entropy (detached).
    """

    student_logp_BT: Tensor
    student_logits_BTV: Tensor
    reference_logits_BTV: Tensor
    entropy_BT: Tensor


@dataclass
class Verdicts:
    """The teacher's verdict on the kept audits of a batch (A of them).

    Fields:
        rows, starts: where each kept audit sits (row index, first chunk token).
        k_sem_A, answered_A: float (A,) semantic count and number of continuations received.
        requested: audits the picker chose (= prefixes sent); ``dropped`` of them got no continuation.
        unanswered: continuations that came back None (failed requests), over all audits.
        continuations: the teacher's texts per kept audit (the group objective scores its own
            candidates against them).
    """

    rows: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    k_sem_A: Tensor = field(default_factory=lambda: torch.zeros(0))
    answered_A: Tensor = field(default_factory=lambda: torch.zeros(0))
    requested: int = 0
    dropped: int = 0
    unanswered: int = 0
    continuations: list[list[str | None]] = field(default_factory=list)


def posterior_target(k_sem_A: Tensor, answered_A: Tensor, pi_bar_A: Tensor, alpha: float) -> Tensor:
    """π̂ = (k_sem + α·π̄) / (N + α): the teacher's agreement, shrunk toward the student's own chunk
    probability π̄ by a Beta prior worth α pseudo-continuations; in [0, 1] whenever φ is."""
    return (k_sem_A + alpha * pi_bar_A) / (answered_A + alpha)


def chunk_weights(target_A: Tensor, pi_bar_A: Tensor, baseline: str) -> Tensor:
    """The weight of each chunk's log-likelihood: π̂, or π̂ less a baseline ("batch": the mean π̂;
    "prior": the chunk's π̄)."""
    if baseline == "batch":
        return target_A - target_A.mean()
    if baseline == "prior":
        return target_A - pi_bar_A
    return target_A


def gather_chunks(values_BT: Tensor, rows: list[int], starts: list[int], chunk_tokens: int) -> Tensor:
    """The C entries of every chunk (row, start) of a (B, T) tensor — log-probs, token ids: (A, C)."""
    rows_A1 = torch.tensor(rows, dtype=torch.long, device=values_BT.device).unsqueeze(-1)
    cols_AC = torch.tensor(starts, dtype=torch.long, device=values_BT.device).unsqueeze(-1)
    cols_AC = cols_AC + torch.arange(chunk_tokens, device=values_BT.device)
    return values_BT[rows_A1, cols_AC]


def anchor_kl(student_logits_BTV: Tensor, reference_logits_BTV: Tensor) -> Tensor:
    """KL(π_ref ‖ π_θ) per position over the full vocabulary: (B, T)."""
    return D.rows_divergence(student_logits_BTV, reference_logits_BTV, "forward_kl", 0.5, 0.1, 1.0)


class SpeculativeVerification(Objective):
    """OmniOPD's settings and loss: which chunks are audited, how the teacher is asked, how its text
    becomes a target (README.md beside this file).

    Args:
        chunk_tokens: C, student tokens per audited chunk (scale it to the task's answers).
        max_audits: M, audits per sequence at most.
        num_continuations: N, teacher continuations per audit.
        alpha: α, weight of the prior (pseudo-continuations that agree with probability π̄).
        beta: β, weight of the KL anchor on the unaudited tokens.
        similarity: φ: "edit", "rouge1", "rougeL", "token_f1", a dotted path to a function
            ``(text, text) -> float`` in [0, 1], or (from Python) a callable.
        reduction: "seq_sum" (sum over a sequence's tokens, mean over sequences) or "token_mean".
        teacher_tokens: the ``max_new_tokens`` asked of the teacher (its own tokens); None = C. Raise
            it when the teacher's tokens are shorter than the student's: the surplus is cut away.
        teacher_temperature: sampling temperature of the continuations (0 = greedy).
        baseline: what is subtracted from π̂ before it weights its chunk (our addition; "none" is the
            reference objective). Every π̂ ≥ 0 pushes its chunk up, the student's own mistakes
            included. "batch": the mean π̂ of the batch's audits (a REINFORCE baseline); "prior": the
            chunk's own π̄, so the weight (k_sem − N·π̄)/(N + α) is how much more the teacher agreed
            than the student expected: chunks it disowns are pushed down.
    """

    capability: ClassVar[TeacherCapability] = TeacherCapability.TEXT_ONLY

    def __init__(
        self, chunk_tokens: int = 50, max_audits: int = 10, num_continuations: int = 10, alpha: float = 1.0,
        beta: float = 0.1, similarity: str | Similarity = "edit",
        reduction: Literal["seq_sum", "token_mean"] = "seq_sum", teacher_tokens: int | None = None,
        teacher_temperature: float = 1.0, baseline: Literal["none", "batch", "prior"] = "none",
    ) -> None:
        for name, value in (("chunk_tokens", chunk_tokens), ("max_audits", max_audits),
                            ("num_continuations", num_continuations), ("teacher_tokens", teacher_tokens)):
            if value is None and name == "teacher_tokens":
                continue
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise SettingError(f"SpeculativeVerification.{name}={value!r} must be an integer >= 1")
        for name, value in (("alpha", alpha), ("beta", beta), ("teacher_temperature", teacher_temperature)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise SettingError(f"SpeculativeVerification.{name}={value!r} must be a finite number >= 0")
        if reduction not in REDUCTIONS:
            raise SettingError(f"SpeculativeVerification.reduction={reduction!r}: use one of "
                             f"{list(REDUCTIONS)}")
        self.chunk_tokens, self.max_audits = chunk_tokens, max_audits
        self.num_continuations = num_continuations
        self.alpha, self.beta, self.reduction = float(alpha), float(beta), reduction
        self.similarity = similarity
        self.similarity_name, self.similarity_fn = resolve_similarity(similarity)
        self.teacher_tokens, self.teacher_temperature = teacher_tokens, float(teacher_temperature)
        if baseline not in BASELINES:
            raise SettingError(f"SpeculativeVerification.baseline={baseline!r}: use one of {list(BASELINES)}")
        self.baseline = baseline

    def uses_reference(self) -> bool:
        return True

    def settings(self) -> dict:
        return {**super().settings(), "similarity": self.similarity_name}

    @property
    def max_new_tokens(self) -> int:
        """Tokens asked of the teacher per continuation."""
        return self.teacher_tokens or self.chunk_tokens

    def __call__(self, batch: RolloutBatch, terms: AnchorTerms, verdicts: Verdicts) -> tuple[Tensor, dict]:
        """(loss, detached diagnostics) on ``batch.loss_mask_BT`` with the kept audits of ``verdicts``."""
        mask_BT = batch.loss_mask_BT.bool()
        logp_BT = terms.student_logp_BT
        C, device = self.chunk_tokens, logp_BT.device
        chunk_total = logp_BT.new_zeros(())
        metrics: dict[str, Tensor | float] = {}
        if verdicts.rows:
            logp_AC = gather_chunks(logp_BT, verdicts.rows, verdicts.starts, C)
            pi_bar_A = logp_AC.detach().mean(-1).exp()
            target_A = posterior_target(verdicts.k_sem_A.to(device), verdicts.answered_A.to(device),
                                        pi_bar_A, self.alpha)
            weight_A = chunk_weights(target_A, pi_bar_A, self.baseline)
            chunk_total = -(weight_A * logp_AC.sum(-1)).sum()
            metrics.update(target_mean=target_A.mean(), target_std=target_A.std(correction=0),
                           pi_bar_mean=pi_bar_A.mean(), chunk_logp=logp_AC.detach().mean(),
                           ksem_zero_frac=(verdicts.k_sem_A == 0).float().mean())
        return self.total_loss(batch, terms, verdicts, chunk_total, metrics)

    def total_loss(self, batch: RolloutBatch, terms: AnchorTerms, verdicts: Verdicts, chunk_total: Tensor,
                   metrics: dict) -> tuple[Tensor, dict]:
        """The chunk term's batch total plus β × the anchor on every loss-mask token outside the audited
        chunks, normalized by ``reduction``; the anchor's and the chunk term's logs added to ``metrics``."""
        mask_BT = batch.loss_mask_BT.bool()
        C, device = self.chunk_tokens, mask_BT.device
        audited_BT = torch.zeros_like(mask_BT)
        if verdicts.rows:
            audited_BT[torch.tensor(verdicts.rows, device=device).unsqueeze(-1),
                       torch.tensor(verdicts.starts, device=device).unsqueeze(-1)
                       + torch.arange(C, device=device)] = True
        other_BT = mask_BT & ~audited_BT
        kl_BT = anchor_kl(terms.student_logits_BTV, terms.reference_logits_BTV)
        anchor_total = torch.where(other_BT, kl_BT, kl_BT.new_zeros(())).sum()
        sequences = (mask_BT.sum(-1) > 0).sum().clamp(min=1)
        divisor = sequences if self.reduction == "seq_sum" else mask_BT.sum().clamp(min=1)
        loss = (chunk_total + self.beta * anchor_total) / divisor
        metrics["anchor_kl"] = D.reduce_masked(kl_BT.detach(), other_BT)
        metrics["chunk_loss"] = chunk_total.detach() / sequences
        return loss, metrics
