"""Full-distribution divergences between a student and a teacher (README.md here, "divergences.py").

Conventions
-----------
* Pure functions, no ``nn.Module``. Per-position functions take **log-probabilities** over the last
  dimension (``(..., V)`` or ``(..., K)``) and return one value per position (the last dim is dropped).
* ``S`` is the student distribution, ``T`` the teacher's. Argument order is always ``(student, teacher)``.
* Tensor locals carry dimension suffixes: B batch, T time (response position), V vocab, K top-k,
  N valid (unmasked) positions, e.g. ``logp_BTV``, ``mask_BT``, ``topk_logp_BTK``, ``values_N``.
* ``mask_BT`` is the response mask: nonzero/True on generated tokens, 0/False on prompt and padding.
  It is treated as boolean (it is not a weight).
* Log-probs must be finite (log_softmax of finite logits is): as with ``F.kl_div(log_target=True)``,
  a −inf entry gives NaN. ``topk_divergence`` clamps teacher log-probs at ``MIN_LOGP`` for this reason.
* Reductions (``reduce_masked``):
  ``token_mean`` = Σ over valid tokens / #valid tokens (TRL ``batchmean``),
  ``seq_mean``   = mean over sequences with ≥1 valid token of each sequence's token mean,
  ``sum``        = Σ over valid tokens.
  An all-masked batch gives 0.0, never NaN, and stays connected to the graph.
* Logit entry points (``logits_divergence``, ``generalized_jsd``, ``topk_divergence``) divide logits by
  ``temperature`` and upcast half precision to float32 before ``log_softmax``.
* Padded vocabularies: student and teacher logits whose last dims differ (embedding matrices padded to
  different sizes, e.g. 151936 vs 152064 rows over one 151665-token tokenizer) are compared over the ids
  both have, the first ``min(V_s, V_t)`` (``common_vocab``). That both cover every id of one shared
  tokenizer is checked at setup (same token→id map; each model's output rows ≥ its tokenizer's ids).
* The generalized JSD follows TRL/GKD: ``M = βT + (1−β)S``,
  ``JSD_β = β KL(T‖M) + (1−β) KL(S‖M)``, with β=0 defined as forward KL(T‖S) and β=1 as reverse KL(S‖T).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lit_opd.errors import SettingError

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
REDUCTIONS = ("token_mean", "seq_mean", "sum")
MIN_LOGP = -1e4  # exp(MIN_LOGP) == 0 in every float dtype; stands in for a server's −inf log-prob


# --------------------------------------------------------------------------------------------------
# per-position divergences on log-probs (..., V) -> (...)
# --------------------------------------------------------------------------------------------------
def _kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """KL(P‖Q) = Σ_v P_v (log P_v − log Q_v) over the last dim."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def _log_mix(a_logp: Tensor, b_logp: Tensor, w: float) -> Tensor:
    """log(w·A + (1−w)·B), computed in log space (logaddexp); w=0 / w=1 return B / A exactly."""
    if not 0.0 <= w <= 1.0:
        raise SettingError(f"mixture weight must be in [0, 1], got {w}")
    if w == 0.0:
        return b_logp
    if w == 1.0:
        return a_logp
    return torch.logaddexp(a_logp + math.log(w), b_logp + math.log1p(-w))


def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Forward (mode-covering) KL(T‖S) = Σ_v T_v (log T_v − log S_v)."""
    return _kl(teacher_logp, student_logp)


def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Reverse (mode-seeking) KL(S‖T) = Σ_v S_v (log S_v − log T_v)."""
    return _kl(student_logp, teacher_logp)


def jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float) -> Tensor:
    """Generalized JSD (TRL/GKD): M = βT + (1−β)S, JSD_β = β KL(T‖M) + (1−β) KL(S‖M).

    β=0 is forward KL(T‖S) and β=1 is reverse KL(S‖T) (special-cased: the mixture form would give 0).
    """
    if not 0.0 <= beta <= 1.0:
        raise SettingError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp)
    mix_logp = _log_mix(teacher_logp, student_logp, beta)
    return beta * _kl(teacher_logp, mix_logp) + (1.0 - beta) * _kl(student_logp, mix_logp)


def skew_forward_kl(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """Skew forward KL (DistiLLM): KL(T ‖ αT + (1−α)S)."""
    return _kl(teacher_logp, _log_mix(teacher_logp, student_logp, alpha))


def skew_reverse_kl(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(S ‖ αS + (1−α)T)."""
    return _kl(student_logp, _log_mix(student_logp, teacher_logp, alpha))


def total_variation(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Total variation distance: ½ Σ_v |T_v − S_v|."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


def per_token_divergence(
    student_logp: Tensor, teacher_logp: Tensor, kind: str, beta: float = 0.5, alpha: float = 0.1
) -> Tensor:
    """Dispatch on ``kind`` ∈ KINDS; ``beta`` is used by "jsd", ``alpha`` by the skew KLs."""
    table: dict[str, Callable[[], Tensor]] = {
        "forward_kl": lambda: forward_kl(student_logp, teacher_logp),
        "reverse_kl": lambda: reverse_kl(student_logp, teacher_logp),
        "jsd": lambda: jsd(student_logp, teacher_logp, beta),
        "skew_forward_kl": lambda: skew_forward_kl(student_logp, teacher_logp, alpha),
        "skew_reverse_kl": lambda: skew_reverse_kl(student_logp, teacher_logp, alpha),
        "tvd": lambda: total_variation(student_logp, teacher_logp),
    }
    _check_kind(kind)
    return table[kind]()


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise SettingError(f"unknown divergence kind {kind!r}; valid kinds: {', '.join(KINDS)}")


# --------------------------------------------------------------------------------------------------
# reduction
# --------------------------------------------------------------------------------------------------
def reduce_masked(values_BT: Tensor, mask_BT: Tensor | None = None, reduction: str = "token_mean") -> Tensor:
    """Reduce per-token values over the valid positions of ``mask_BT`` (see module docstring).

    token_mean = Σ_{valid} v / max(#valid, 1); seq_mean = mean_{b: #valid_b>0} (Σ_t v_bt / #valid_b);
    sum = Σ_{valid} v. Masked positions never leak NaN/inf (they are selected out with ``where``).
    """
    if reduction not in REDUCTIONS:
        raise SettingError(f"unknown reduction {reduction!r}; valid reductions: {', '.join(REDUCTIONS)}")
    if mask_BT is None:
        mask_BT = torch.ones_like(values_BT, dtype=torch.bool)
    if mask_BT.shape != values_BT.shape:
        raise SettingError(f"mask shape {tuple(mask_BT.shape)} != values shape {tuple(values_BT.shape)}")
    valid_BT = mask_BT.bool()
    masked_BT = torch.where(valid_BT, values_BT, values_BT.new_zeros(()))
    if reduction == "sum":
        return masked_BT.sum()
    if reduction == "token_mean":
        return masked_BT.sum() / valid_BT.sum().clamp(min=1).to(values_BT.dtype)
    count_B = valid_BT.sum(-1)
    seq_mean_B = masked_BT.sum(-1) / count_B.clamp(min=1).to(values_BT.dtype)
    num_seqs = (count_B > 0).sum().clamp(min=1).to(values_BT.dtype)
    return seq_mean_B.sum() / num_seqs  # sequences with no valid token contribute 0 to the sum


# --------------------------------------------------------------------------------------------------
# logit entry points
# --------------------------------------------------------------------------------------------------
def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / τ) over the last dim, in at least float32."""
    logits = logits.to(_compute_dtype(logits))
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


def common_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Both logits over the ids both have: the last dim cut to the narrower of the two (padded
    embedding matrices; see the module docstring). Other dims must agree."""
    if student_logits.shape == teacher_logits.shape:
        return student_logits, teacher_logits
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise SettingError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in more than the vocabulary dim"
        )
    V = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :V], teacher_logits[..., :V]


def rows_divergence(
    student_logits: Tensor, teacher_logits: Tensor, kind: str, beta: float, alpha: float, temperature: float
) -> Tensor:
    """Per-row divergence from logits (..., V) -> (...), over :func:`common_vocab`."""
    student_logits, teacher_logits = common_vocab(student_logits, teacher_logits)
    s_logp = _log_softmax(student_logits, temperature)
    t_logp = _log_softmax(teacher_logits, temperature)
    return per_token_divergence(s_logp, t_logp, kind, beta=beta, alpha=alpha)


def rows_divergence_and_grad(
    student_logits: Tensor, teacher_logits: Tensor, kind: str, beta: float, alpha: float, temperature: float
) -> tuple[Tensor, Tensor]:
    """Per-row divergence (n,) and its gradient with respect to the student logits (n, V).

    Forward KL, reverse KL and JSD_β use their closed forms: with q = softmax(s/τ) and
    g = ∂D/∂q, ∂D/∂s = q ⊙ (g − Σ q g) / τ, where g = −p/q (forward KL), log q − log p + 1
    (reverse KL) and (1−β)(log q − log M) (JSD, M = βp + (1−β)q). That keeps ~5 [n, V] buffers
    alive where autograd through ``rows_divergence`` keeps ~25 (the fused lean loss's chunk
    memory). Other kinds go through autograd.
    """
    closed = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(kind, beta if kind == "jsd" else None)
    if closed is None:
        with torch.enable_grad():
            logits = student_logits.detach().requires_grad_(True)
            values = rows_divergence(logits, teacher_logits, kind, beta, alpha, temperature)
            (grad,) = torch.autograd.grad(values.sum(), logits)
        return values.detach(), grad
    s_logp = _log_softmax(student_logits.detach(), temperature)
    t_logp = _log_softmax(teacher_logits.detach(), temperature)
    q = s_logp.exp()
    if closed == 0.0:  # forward KL(T‖S): ∂/∂s = (q − p)/τ
        p = t_logp.exp()
        values = (p * (t_logp - s_logp)).sum(-1)
        return values, q.sub_(p).div_(temperature)
    if closed == 1.0:  # reverse KL(S‖T)
        g = s_logp.sub_(t_logp)
    else:
        mix_logp = _log_mix(t_logp, s_logp, closed)
        kl_t = _kl(t_logp, mix_logp)
        g = s_logp.sub_(mix_logp).mul_(1.0 - closed)  # (1−β)(log q − log M)
    mean_g = (q * g).sum(-1, keepdim=True)
    values = mean_g.squeeze(-1) if closed == 1.0 else closed * kl_t + mean_g.squeeze(-1)
    return values, q.mul_(g.sub_(mean_g)).div_(temperature)


def logits_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "jsd",
    beta: float = 0.5,
    alpha: float = 0.1,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "token_mean",
    chunk_size: int | None = None,
) -> Tensor:
    """Scalar divergence between student and teacher logits (B,T,V), reduced over ``mask`` (B,T).

    Per position: D(softmax(s/τ), softmax(t/τ)) with D chosen by ``kind``, over :func:`common_vocab`;
    then ``reduce_masked``.
    With ``chunk_size`` the valid positions are processed ``chunk_size`` rows at a time under
    activation checkpointing, so the full-vocab log-softmax of all tokens is never held at once.
    """
    _check_kind(kind)
    student_logits, teacher_logits = common_vocab(student_logits, teacher_logits)
    if temperature <= 0:
        raise SettingError(f"temperature must be > 0, got {temperature}")
    if chunk_size is None:
        values_BT = rows_divergence(student_logits, teacher_logits, kind, beta, alpha, temperature)
        return reduce_masked(values_BT, mask, reduction)
    return _chunked_divergence(
        student_logits, teacher_logits, kind, beta, alpha, mask, temperature, reduction, chunk_size
    )


def _chunked_divergence(
    student_logits_BTV: Tensor,
    teacher_logits_BTV: Tensor,
    kind: str,
    beta: float,
    alpha: float,
    mask_BT: Tensor | None,
    temperature: float,
    reduction: str,
    chunk_size: int,
) -> Tensor:
    """Select valid rows (N,V), compute them in checkpointed chunks, scatter back to (B,T), reduce."""
    if chunk_size < 1:
        raise SettingError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, V = student_logits_BTV.shape
    if mask_BT is None:
        mask_BT = torch.ones(B, T, dtype=torch.bool, device=student_logits_BTV.device)
    idx_N = mask_BT.bool().reshape(-1).nonzero().squeeze(-1)
    s_logits_NV = student_logits_BTV.reshape(-1, V).index_select(0, idx_N)
    t_logits_NV = teacher_logits_BTV.reshape(-1, V).index_select(0, idx_N)
    use_ckpt = torch.is_grad_enabled() and (s_logits_NV.requires_grad or t_logits_NV.requires_grad)
    chunks: list[Tensor] = []
    for start in range(0, idx_N.numel(), chunk_size):
        rows = slice(start, start + chunk_size)
        args = (s_logits_NV[rows], t_logits_NV[rows], kind, beta, alpha, temperature)
        if use_ckpt:
            # no randomness inside, so the RNG state need not be stashed per chunk
            chunks.append(checkpoint(rows_divergence, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            chunks.append(rows_divergence(*args))
    dtype = _compute_dtype(student_logits_BTV)
    # N == 0: an empty, graph-connected row sum keeps the all-masked result differentiable.
    values_N = torch.cat(chunks) if chunks else s_logits_NV.to(dtype).sum(-1)
    values_flat = values_N.new_zeros(B * T).index_put((idx_N,), values_N)
    return reduce_masked(values_flat.view(B, T), mask_BT, reduction)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "token_mean",
    chunk_size: int | None = None,
) -> Tensor:
    """GKD loss: JSD_β(softmax(s/τ), softmax(t/τ)) per position, reduced over ``mask``.

    Equals TRL ``GKDTrainer.generalized_jsd_loss(..., reduction="batchmean")`` for token_mean.
    """
    return logits_divergence(
        student_logits,
        teacher_logits,
        kind="jsd",
        beta=beta,
        mask=mask,
        temperature=temperature,
        reduction=reduction,
        chunk_size=chunk_size,
    )


# --------------------------------------------------------------------------------------------------
# top-k teacher
# --------------------------------------------------------------------------------------------------
def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable at both ends (Mächler 2012); x is clamped to ≤ −eps."""
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _with_tail(topk_logp_BTK: Tensor) -> Tensor:
    """Append the bucket log(1 − Σ_k exp(logp_k)) -> (B,T,K+1)."""
    tail_BT1 = log1mexp(torch.logsumexp(topk_logp_BTK, dim=-1, keepdim=True))
    return torch.cat([topk_logp_BTK, tail_BT1], dim=-1)


def topk_divergence(
    student_logits_BTV: Tensor, teacher_topk_logp_BTK: Tensor, teacher_topk_ids_BTK: Tensor,
    kind: str = "jsd", beta: float = 0.5, alpha: float = 0.1, mask: Tensor | None = None,
    temperature: float = 1.0, reduction: str = "token_mean", tail_bucket: bool = True,
) -> Tensor:
    """Divergence against a teacher that only exposes its top-k log-probs (B,T,K) and ids (B,T,K).

    The student's log-probs log softmax(s/τ) are gathered at the teacher's ids. With ``tail_bucket``
    both get a (K+1)-th outcome holding the remaining mass log(1 − Σ_k p_k); otherwise both are
    renormalised over the K entries. ``temperature`` applies to the student logits only: the teacher
    log-probs are used as given. With K = V and a tail bucket this equals ``logits_divergence``.
    """
    _check_kind(kind)
    s_logp_BTV = _log_softmax(student_logits_BTV, temperature)
    s_topk_BTK = s_logp_BTV.gather(-1, teacher_topk_ids_BTK.long())
    t_topk_BTK = teacher_topk_logp_BTK.to(s_topk_BTK.dtype).clamp(min=MIN_LOGP)
    if tail_bucket:
        s_topk_BTK, t_topk_BTK = _with_tail(s_topk_BTK), _with_tail(t_topk_BTK)
    else:
        s_topk_BTK = s_topk_BTK - torch.logsumexp(s_topk_BTK, dim=-1, keepdim=True)
        t_topk_BTK = t_topk_BTK - torch.logsumexp(t_topk_BTK, dim=-1, keepdim=True)
    values_BT = per_token_divergence(s_topk_BTK, t_topk_BTK, kind, beta=beta, alpha=alpha)
    return reduce_masked(values_BT, mask, reduction)


# --------------------------------------------------------------------------------------------------
# token-level helpers
# --------------------------------------------------------------------------------------------------
def token_logprobs(logits_BTV: Tensor, ids_BT: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits/τ)[ids] = logits_id/τ − logsumexp(logits/τ), without a (B,T,V) log-softmax."""
    logits_BTV = logits_BTV.to(_compute_dtype(logits_BTV))
    if temperature != 1.0:
        logits_BTV = logits_BTV / temperature
    picked_BT = logits_BTV.gather(-1, ids_BT.long().unsqueeze(-1)).squeeze(-1)
    return picked_BT - torch.logsumexp(logits_BTV, dim=-1)


def entropy(logits_BTV: Tensor) -> Tensor:
    """Entropy of softmax(logits): H = −Σ_v p_v log p_v -> (B,T)."""
    logp_BTV = _log_softmax(logits_BTV, 1.0)
    return -(logp_BTV.exp() * logp_BTV).sum(-1)
