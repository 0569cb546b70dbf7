"""Sampled-token OPD objectives (README.md here, "sampled.py"): advantages and policy-gradient losses.

Conventions
-----------
* Pure functions on per-token log-probs of the *sampled* tokens, shape (B,T): ``logp_BT`` is the
  current student (carries grad), ``old_logp_BT`` the detached rollout-time student, ``sampler_logp_BT``
  the sampling engine's log-probs (e.g. vLLM), ``teacher_logp_BT`` log p, ``ref_logp_BT`` log π_ref.
* Advantages and importance weights are returned detached; losses treat them as constants.
* ``mask_BT`` marks generated tokens; losses are reduced with ``divergences.reduce_masked``
  (default ``token_mean`` = verl's ``token-mean`` loss_agg_mode).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_opd.errors import SettingError
from lit_opd.objectives.divergences import reduce_masked

_LOG_RATIO_CLAMP = 20.0


def reverse_kl_advantage(sampler_logp_BT: Tensor, teacher_logp_BT: Tensor, kl_coef: float = 1.0) -> Tensor:
    """Tinker OPD advantage A_t = −κ (log q_samp(y_t) − log p(y_t)) (per-token reverse KL reward)."""
    return (-kl_coef * (sampler_logp_BT - teacher_logp_BT)).detach()


def gopd_advantage(
    old_logp_BT: Tensor, teacher_logp_BT: Tensor, ref_logp_BT: Tensor, lambda_: float = 1.0
) -> Tensor:
    """G-OPD / ExOPD advantage A_t = λ (log p − log π_ref) − (log q_old − log π_ref).

    λ=1 gives standard OPD (A_t = log p − log q_old); λ>1 extrapolates past the teacher.
    """
    reward_BT = lambda_ * (teacher_logp_BT - ref_logp_BT)
    return (reward_BT - (old_logp_BT - ref_logp_BT)).detach()


def importance_sampling_loss(
    logp_BT: Tensor,
    sampler_logp_BT: Tensor,
    adv_BT: Tensor,
    mask_BT: Tensor,
    reduction: str = "token_mean",
    cap: float | None = None,
) -> Tensor:
    """Tinker ``importance_sampling`` loss: L = reduce(−exp(log q_θ − log q_samp) · A).

    The gradient per valid token is −A·r·∇log q_θ (−A·∇log q_θ on-policy, where r = 1). With ``cap``
    (truncated IS, as verl/NeMo-RL/slime correct an inference engine's drift from the trainer) the
    weight is min(r, C): L = reduce(−min(r, C)·exp(log q_θ − sg(log q_θ))·A), same value where r ≤ C
    and gradient −A·min(r, C)·∇log q_θ everywhere.
    """
    if cap is None:
        ratio_BT = torch.exp(logp_BT - sampler_logp_BT.detach())
    else:
        weight_BT = torch.exp(logp_BT.detach() - sampler_logp_BT.detach()).clamp(max=cap)
        ratio_BT = weight_BT * torch.exp(logp_BT - logp_BT.detach())
    return reduce_masked(-ratio_BT * adv_BT.detach(), mask_BT, reduction)


def mismatch_kl(logp_BT: Tensor, sampler_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """KL(q_samp ‖ q_θ) estimated on the sampled tokens (Schulman's k3: r − 1 − log r with
    r = q_θ / q_samp; unbiased and ≥ 0): how far the engine that drew the rollout is from the student
    that trains on it. 0 for the built-in engine at temperature 1; with another temperature or
    top-k/top-p the engine's (processed) distribution differs from the student's by design."""
    log_ratio_BT = (logp_BT.detach() - sampler_logp_BT).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return reduce_masked(torch.exp(log_ratio_BT) - 1.0 - log_ratio_BT, mask_BT)


def truncated_is_weights(old_logp_BT: Tensor, sampler_logp_BT: Tensor, cap: float = 5.0) -> Tensor:
    """Truncated rollout importance weights w = min(exp(log q_old − log q_samp), C), detached."""
    return torch.exp(old_logp_BT - sampler_logp_BT).clamp(max=cap).detach()


def ppo_clip_loss(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    adv_BT: Tensor,
    mask_BT: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = 3.0,
    is_weights_BT: Tensor | None = None,
    reduction: str = "token_mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """verl vanilla PPO loss with dual clip and optional truncated IS weights.

    r = exp(clamp(log q_θ − log q_old, −20, 20)); l1 = −A·r; l2 = −A·clip(r, 1−ε_lo, 1+ε_hi);
    l = max(l1, l2); where A<0: l = min(l, −A·c_dual); l = l·w_IS; L = reduce(l, mask).

    Returns (loss, stats) with detached stats ``clip_frac`` (fraction of valid tokens with l2 > l1),
    ``clip_frac_lower`` (dual clip active) and ``ratio_mean`` (mean r over valid tokens).
    """
    adv_BT = adv_BT.detach()
    log_ratio_BT = (logp_BT - old_logp_BT.detach()).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio_BT = torch.exp(log_ratio_BT)
    l1_BT = -adv_BT * ratio_BT
    l2_BT = -adv_BT * ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high)
    clipped_BT = torch.maximum(l1_BT, l2_BT)
    loss_BT = clipped_BT
    dual_active_BT = torch.zeros_like(clipped_BT, dtype=torch.bool)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise SettingError(f"dual_clip must be > 1, got {dual_clip}")
        l3_BT = -adv_BT * dual_clip
        dual_active_BT = (adv_BT < 0) & (clipped_BT > l3_BT)
        loss_BT = torch.where(adv_BT < 0, torch.minimum(clipped_BT, l3_BT), clipped_BT)
    if is_weights_BT is not None:
        loss_BT = loss_BT * is_weights_BT.detach()
    loss = reduce_masked(loss_BT, mask_BT, reduction)
    with torch.no_grad():
        stats = {
            "clip_frac": reduce_masked((l2_BT > l1_BT).to(ratio_BT.dtype), mask_BT),
            "clip_frac_lower": reduce_masked(dual_active_BT.to(ratio_BT.dtype), mask_BT),
            "ratio_mean": reduce_masked(ratio_BT, mask_BT),
        }
    return loss, stats
