"""MAD-OPD's math: teacher weights, per-teacher per-sample divergences, their mixture and the batch loss.

Pure functions on tensors. Shapes: B rows (samples), T completion positions, V vocabulary, K teachers.
Per sample m and teacher k (README.md here, equations (1)–(4)):

* ``w_mk``: one-hot (routed), fixed (``fixed_weights``) or ``softmax_k(c_mk / 100 / τ)`` (debate,
  ``confidence_weights``; uniform where a confidence is missing).
* ``ℓ_mk``: the mean of D(P_k,t ‖ S_t) over the positions t < T'_mk = min(T_m, T_mk) that teacher k
  covered (``covered_mask``, ``sample_divergences``).
* ``loss_m = Σ_k w̄_mk ℓ_mk`` with ``w̄`` renormalised over the teachers that answered (``mix``).
* the batch loss over the samples with ``loss_m > 1e-8`` (``reduce_samples``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lit_opd.errors import SettingError
from lit_opd.objectives import divergences as D
from lit_opd.objectives.components import Divergence
from lit_opd.types import TeacherOutput

SKIP_AT = 1e-8  # a sample whose mixed loss is at most this gives no gradient worth a step: skipped, counted


def confidence_weights(confidence_BK: Tensor, tau: float = 1.0) -> Tensor:
    """``softmax_k(c_k / 100 / τ)`` per row; a row with any missing confidence (NaN) gets uniform weights."""
    K = confidence_BK.shape[-1]
    missing_B1 = confidence_BK.isnan().any(-1, keepdim=True)
    w_BK = torch.softmax(confidence_BK.nan_to_num(0.0).double() / 100.0 / tau, dim=-1).to(confidence_BK.dtype)
    return torch.where(missing_B1, torch.full_like(w_BK, 1.0 / K), w_BK)


def fixed_weights(weights: Mapping[str, float] | None, names: Sequence[str], owner: str) -> dict[str, float]:
    """Validated weights over ``names``, normalised to sum 1 (None = uniform)."""
    if weights is None:
        return {name: 1.0 / len(names) for name in names}
    if not isinstance(weights, Mapping):
        raise SettingError(f"{owner}.weights must map teacher name -> weight, e.g. {{{names[0]}: 0.5, ...}}")
    missing, unknown = [n for n in names if n not in weights], [n for n in weights if n not in names]
    if missing or unknown:
        raise SettingError(f"{owner}.weights must give one weight per teacher {list(names)}: "
                         f"missing {missing}, unknown {unknown}")
    bad = {n: w for n, w in weights.items()
           if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)}
    if bad:
        raise SettingError(f"{owner}.weights {bad}: every weight must be a finite number >= 0")
    total = float(sum(weights.values()))
    if total <= 0:
        raise SettingError(f"{owner}.weights are all 0; give at least one teacher a positive weight")
    return {n: float(weights[n]) / total for n in names}


def covered_mask(mask_BT: Tensor, covered_B: Tensor | None) -> Tensor:
    """``mask_BT`` restricted to the first ``covered_B[b]`` positions of each row (all, when None)."""
    mask_BT = mask_BT.bool()
    if covered_B is None:
        return mask_BT
    T = mask_BT.shape[1]
    return mask_BT & (torch.arange(T, device=mask_BT.device)[None, :] < covered_B.to(mask_BT.device)[:, None])


def masked_row_mean(values_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean of each row's values over its masked positions (0 for a row with none): (B,)."""
    mask_BT = mask_BT.bool()
    total_B = torch.where(mask_BT, values_BT, values_BT.new_zeros(())).sum(-1)
    return total_B / mask_BT.sum(-1).clamp(min=1).to(values_BT.dtype)


def teacher_topk(out: TeacherOutput, top_k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """The teacher's first ``top_k`` log-probs and ids: taken from its logits (at τ) or from the
    (descending) top-k it returned, as :class:`~lit_opd.objectives.Divergence` does."""
    if out.topk_logp_BTK is None:
        return (out.logits_BTV.float() / temperature).log_softmax(-1).topk(top_k, dim=-1)
    if out.topk_logp_BTK.shape[-1] < top_k:
        raise SettingError(f"Divergence.top_k={top_k} but a teacher returned only "
                         f"{out.topk_logp_BTK.shape[-1]} log-probs per position; lower top_k or raise that "
                         "teacher's k")
    return out.topk_logp_BTK[..., :top_k], out.topk_ids_BTK[..., :top_k]


def sample_divergences(
    student_logits_BTV: Tensor, out: TeacherOutput, cover_BT: Tensor, div: Divergence, temperature: float,
) -> Tensor:
    """ℓ_b: each row's mean of D(teacher ‖ student) over its covered positions (B,), differentiable in
    the student's logits. D, β, α and top-k come from ``div``; ``temperature`` divides the logits."""
    settings = dict(kind=div.kind, beta=div.beta, alpha=div.alpha)
    if div.top_k is None:
        values_BT = D.rows_divergence(student_logits_BTV, out.logits_BTV, temperature=temperature, **settings)
        return masked_row_mean(values_BT, cover_BT)
    topk_logp_BTK, topk_ids_BTK = teacher_topk(out, div.top_k, temperature)
    # topk_divergence reduces over its mask; one call per row gives each row's own token mean.
    rows = [
        D.topk_divergence(student_logits_BTV[b : b + 1], topk_logp_BTK[b : b + 1], topk_ids_BTK[b : b + 1],
                          mask=cover_BT[b : b + 1], temperature=temperature, reduction="token_mean",
                          **settings)
        for b in range(student_logits_BTV.shape[0])
    ]
    return torch.stack(rows)


def top1_agreement(student_logits_BTV: Tensor, out: TeacherOutput, cover_BT: Tensor) -> Tensor:
    """Fraction of covered positions where the student's and the teacher's most likely tokens agree."""
    teacher_top_BT = out.logits_BTV.argmax(-1) if out.logits_BTV is not None else out.topk_ids_BTK[..., 0]
    same_BT = (student_logits_BTV.detach().argmax(-1) == teacher_top_BT.to(student_logits_BTV.device)).float()
    return D.reduce_masked(same_BT, cover_BT)


def mix(ell_BK: Tensor, w_BK: Tensor, valid_BK: Tensor) -> tuple[Tensor, Tensor]:
    """``loss_b = Σ_k w̄_bk ℓ_bk`` with ``w̄`` the weights renormalised over the valid (answered,
    covering) teachers of row b; a row with none gets loss 0 and zero weights. Returns (loss_B, w̄_BK)."""
    w_BK = torch.where(valid_BK.bool(), w_BK.to(ell_BK.dtype), ell_BK.new_zeros(()))
    total_B1 = w_BK.sum(-1, keepdim=True)
    wbar_BK = torch.where(total_B1 > 0, w_BK / total_B1.clamp(min=1e-30), w_BK.new_zeros(()))
    # an invalid teacher's ℓ may be filler; `where` keeps it out of both the value and the gradient
    safe_ell_BK = torch.where(wbar_BK > 0, ell_BK, ell_BK.new_zeros(()))
    return (wbar_BK * safe_ell_BK).sum(-1), wbar_BK


def reduce_samples(loss_B: Tensor, tokens_B: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    """The batch loss over the kept samples (``loss_b > 1e-8``): "seq_mean" = their mean (the paper),
    "token_mean" = their mean weighted by token count, "sum" = Σ tokens·loss. Returns (loss, kept_B);
    with no sample kept the loss is 0, still connected to the graph."""
    kept_B = loss_B.detach() > SKIP_AT
    zero = loss_B.new_zeros(())
    if reduction == "seq_mean":
        weight_B = kept_B.to(loss_B.dtype)
        denom = kept_B.sum().clamp(min=1).to(loss_B.dtype)
    else:
        weight_B = torch.where(kept_B, tokens_B.to(loss_B.dtype), zero)
        denom = weight_B.sum().clamp(min=1) if reduction == "token_mean" else loss_B.new_ones(())
    return (torch.where(kept_B, loss_B, zero) * weight_B).sum() / denom, kept_B
