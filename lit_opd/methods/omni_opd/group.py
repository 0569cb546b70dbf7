"""OmniOPD's group objective: at each audit, several student chunks compete for the teacher's agreement.

The default objective (:class:`SpeculativeVerification`) weights the one chunk the student sampled by
π̂ ≥ 0, so every audited chunk is pushed up, wrong ones a little less. Here each audit a gets N
candidate chunks from the same prefix: the sampled chunk and N − 1 fresh ones from the student
(temperature ``candidate_temperature``, C tokens or up to an end token). Each candidate i is scored
against the same M teacher continuations as the default, with the same Beta-prior target

    r_ai = (k_sem_ai + α·π̄_ai) / (M + α)            π̄_ai = exp(mean log π_θ over the candidate)

and its advantage is standardized within the audit (population std, ε = 1e-6):

    A_ai = (r_ai − mean_i r_a) / (std_i r_a + ε)

so the candidates the teacher agrees with more than their siblings are pushed up and the others down,
whatever the prefix's difficulty. Loss of a batch:

    L = −Σ_a Σ_i A_ai · Σ_τ log π_θ(z_ai,τ | prefix_a, z_ai,<τ)  +  β · Σ_{t∉chunks} KL(π_ref ‖ π_θ)_t

normalized like the default (``seq_sum``: over sequences; ``token_mean``: over the rollout's loss tokens).
An audit whose candidates all score the same ("dead") has A = 0 and teaches nothing; its fraction is
logged. Teacher cost is the default's (one set of continuations per audit); the student pays N − 1
short samples and a forward over N candidates per audit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lit_opd.errors import SettingError
from lit_opd.methods.omni_opd.objective import AnchorTerms, SpeculativeVerification, Verdicts, posterior_target
from lit_opd.methods.omni_opd.similarity import Similarity
from lit_opd.types import RolloutBatch

#: Added to the within-audit std so that an audit of equal rewards gives A = 0, not 0/0.
ADVANTAGE_EPS = 1e-6


@dataclass
class Candidates:
    """The N candidate chunks of A audits, as the student scores them now.

    Fields:
        logp_ANC: log π_θ of every candidate token (differentiable), (A, N, C).
        mask_ANC: bool (A, N, C), True on the candidate's tokens (a fresh sample may end early).
        k_sem_AN, answered_AN: the semantic count of each candidate against its audit's continuations,
            and how many continuations it was compared with.
    """

    logp_ANC: Tensor
    mask_ANC: Tensor
    k_sem_AN: Tensor
    answered_AN: Tensor


def standardized_advantages(reward_AN: Tensor) -> Tensor:
    """(r − mean) / (std + ε) within each audit (population std): (A, N)."""
    centred_AN = reward_AN - reward_AN.mean(-1, keepdim=True)
    return centred_AN / (reward_AN.std(-1, keepdim=True, correction=0) + ADVANTAGE_EPS)


class GroupVerification(SpeculativeVerification):
    """OmniOPD's group objective (module docstring); the settings of :class:`SpeculativeVerification`
    (C, M audits, N teacher continuations, α, β, φ, reduction, teacher sampling) plus:

    Args:
        candidates: student candidates per audit, the sampled chunk included (≥ 2).
        candidate_temperature: sampling temperature of the N − 1 fresh candidates.
    """

    def __init__(
        self, candidates: int = 4, candidate_temperature: float = 1.0, chunk_tokens: int = 50,
        max_audits: int = 10, num_continuations: int = 10, alpha: float = 1.0, beta: float = 0.1,
        similarity: str | Similarity = "edit", reduction: Literal["seq_sum", "token_mean"] = "seq_sum",
        teacher_tokens: int | None = None, teacher_temperature: float = 1.0,
    ) -> None:
        super().__init__(chunk_tokens=chunk_tokens, max_audits=max_audits, num_continuations=num_continuations,
                         alpha=alpha, beta=beta, similarity=similarity, reduction=reduction,
                         teacher_tokens=teacher_tokens, teacher_temperature=teacher_temperature)
        if not (isinstance(candidates, int) and not isinstance(candidates, bool) and candidates >= 2):
            raise SettingError(f"GroupVerification.candidates={candidates!r} must be an integer >= 2 (the sampled "
                             "chunk and at least one fresh one to compare it with)")
        if not (isinstance(candidate_temperature, (int, float)) and math.isfinite(candidate_temperature)
                and candidate_temperature > 0):
            raise SettingError(f"GroupVerification.candidate_temperature={candidate_temperature!r} must be > 0")
        self.candidates, self.candidate_temperature = candidates, float(candidate_temperature)

    def __call__(self, batch: RolloutBatch, terms: AnchorTerms, verdicts: Verdicts,
                 candidates: Candidates | None = None) -> tuple[Tensor, dict]:
        """(loss, detached diagnostics): the group policy term over ``candidates`` plus the anchor."""
        chunk_total = terms.student_logp_BT.new_zeros(())
        metrics: dict[str, Tensor | float] = {}
        if verdicts.rows and candidates is not None:
            c = candidates
            logp_sum_AN = torch.where(c.mask_ANC, c.logp_ANC, c.logp_ANC.new_zeros(())).sum(-1)
            tokens_AN = c.mask_ANC.sum(-1).clamp(min=1)
            pi_bar_AN = (logp_sum_AN.detach() / tokens_AN).exp()
            reward_AN = posterior_target(c.k_sem_AN, c.answered_AN, pi_bar_AN, self.alpha)
            advantage_AN = standardized_advantages(reward_AN)
            chunk_total = -(advantage_AN * logp_sum_AN).sum()
            spread_A = reward_AN.std(-1, correction=0)
            metrics.update(target_mean=reward_AN.mean(), target_std=spread_A.mean(),
                           dead_audit_frac=(spread_A == 0).float().mean(), pi_bar_mean=pi_bar_AN.mean(),
                           sampled_chunk_advantage=advantage_AN[:, 0].mean(),
                           ksem_zero_frac=(c.k_sem_AN == 0).float().mean())
        return self.total_loss(batch, terms, verdicts, chunk_total, metrics)
