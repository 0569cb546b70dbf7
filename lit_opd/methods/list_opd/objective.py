"""ListOPD's objective: the G-OPD advantage under a PPO clip measured against the warm start.

Per completion token y_t of an on-policy rollout (π_ref = the frozen warm start, q_old the detached
current student, q_samp the sampler):

    A_t = κ [λ (log p_t − log π_ref,t) − (log q_old,t − log π_ref,t)]        (G-OPD advantage)
    r_t = q_θ(y_t) / π_ref(y_t)                                            (base-relative ratio)
    w_t = π_ref(y_t)/q_old(y_t) · min(q_old(y_t)/q_samp(y_t), C)            (detached weights)
    l_t = w_t · max(−A_t r_t, −A_t clip(r_t, 1−c, 1+c))       L = Σ_t mask_t l_t / Σ_t mask_t

i.e. ``objectives.sampled.ppo_clip_loss`` with ``old_logp = log π_ref``: the clip keeps q/π_ref
inside [1−c, 1+c]. The weight π_ref/q_old turns student samples into warm-start ones, so
r_t·w_t = q_θ/q_old · min(q_old/q_samp, C): inside the band the gradient is exactly the on-policy
G-OPD gradient and the fixed point is q* ∝ π_ref^{1−λ} p^λ; outside it (in the direction A pushes)
the gradient is zero. ``reweight_to_base=False`` drops π_ref/q_old (plain PPO against the base:
the gradient is scaled by q/π_ref, which moves the fixed point).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from lit_opd.errors import SettingError
from lit_opd.objectives import divergences as D
from lit_opd.objectives import sampled as O
from lit_opd.objectives.components import REDUCTIONS, Objective, TokenTerms
from lit_opd.types import RolloutBatch, TeacherCapability, TeacherOutput


def base_relative_ppo_loss(
    logp_BT: Tensor, ref_logp_BT: Tensor, teacher_logp_BT: Tensor, sampler_logp_BT: Tensor, mask_BT: Tensor,
    lambda_: float, clip: float, kl_coef: float = 1.0, dual_clip: float | None = None, tis_cap: float = 5.0,
    reweight_to_base: bool = True, reduction: str = "token_mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The ListOPD loss (module docstring): G-OPD advantage, PPO clip against π_ref."""
    old_logp_BT = logp_BT.detach()
    adv_BT = kl_coef * O.gopd_advantage(old_logp_BT, teacher_logp_BT, ref_logp_BT, lambda_)
    weights_BT = O.truncated_is_weights(old_logp_BT, sampler_logp_BT, tis_cap)
    if reweight_to_base:
        weights_BT = weights_BT * torch.exp(ref_logp_BT - old_logp_BT).detach()
    loss, stats = O.ppo_clip_loss(logp_BT, ref_logp_BT, adv_BT, mask_BT, eps_low=clip, eps_high=clip,
                                  dual_clip=dual_clip, is_weights_BT=weights_BT, reduction=reduction)
    return loss, {"advantage": D.reduce_masked(adv_BT, mask_BT), "clip_frac": stats["clip_frac"],
                  "clip_frac_lower": stats["clip_frac_lower"], "base_ratio_mean": stats["ratio_mean"]}


class BaseRelativeClip(Objective):
    """G-OPD with extrapolation λ and a PPO clip of strength c against the warm start π_ref.

    λ is not a setting here: :class:`~lit_opd.methods.list_opd.ListOPDModule` resolves it (a number,
    or λ* − δ from the calibrated cliff) and sets :attr:`lambda_` before training.

    Args:
        clip: c, the base-relative clip strength (ratios q/π_ref kept in [1−c, 1+c]).
        kl_coef: κ, scale of the advantage.
        dual_clip: verl's dual clip for negative advantages (None = off).
        tis_cap: truncated importance-sampling cap C on q_old/q_samp.
        reweight_to_base: multiply by π_ref/q_old (see the module docstring).
        reduction: "token_mean", "seq_mean" or "sum".
    """

    capability: ClassVar[TeacherCapability] = TeacherCapability.TOKEN_LOGPROBS
    on_policy_only: ClassVar[bool] = True

    def __init__(
        self,
        clip: float = 0.2,
        kl_coef: float = 1.0,
        dual_clip: float | None = None,
        tis_cap: float = 5.0,
        reweight_to_base: bool = True,
        reduction: Literal["token_mean", "seq_mean", "sum"] = "token_mean",
    ) -> None:
        if not 0.0 < clip < 1.0:
            raise SettingError(f"BaseRelativeClip.clip={clip} must be in (0, 1)")
        if reduction not in REDUCTIONS:
            raise SettingError(f"BaseRelativeClip.reduction={reduction!r}: use one of {list(REDUCTIONS)}")
        self.clip, self.kl_coef, self.dual_clip, self.tis_cap = clip, kl_coef, dual_clip, tis_cap
        self.reweight_to_base, self.reduction = reweight_to_base, reduction
        self.lambda_: float | None = None

    def uses_reference(self) -> bool:
        return True

    def __call__(
        self, batch: RolloutBatch, terms: TokenTerms, teacher_out: TeacherOutput
    ) -> tuple[Tensor, dict]:
        if self.lambda_ is None:
            raise RuntimeError("ListOPD: λ is not set yet (lambda_='auto' resolves when fit starts); "
                               "call calibrate(records) or set_lambda_star(value) first")
        if batch.sampler_logp_BT is None:
            raise SettingError("ListOPDModule trains on its own samples; this batch has no sampler log-probs")
        return base_relative_ppo_loss(
            terms.student_logp_BT, terms.reference_logp_BT, terms.teacher_logp_BT, batch.sampler_logp_BT,
            batch.loss_mask_BT, self.lambda_, self.clip, self.kl_coef, self.dual_clip, self.tis_cap,
            self.reweight_to_base, self.reduction,
        )
