"""The extrapolation cliff: the clip-safe extrapolation threshold λ*(p,b,c) (README.md here, "The cliff λ*").

Paper: "The Extrapolation Cliff in On-Policy Distillation of Near-Deterministic Structured Outputs"
(ListOPD), arXiv 2605.08737, https://lixin.ai/ListOPD. The paper states that a closed-form,
base-relative clip-safety threshold λ*(p,b,c) exists; its formula was not available to us.
**Every closed form in this module is our own derivation**, not the paper's text; the
hand values in the tests are computed from it, not taken from the paper.

Setup (one structural position, Bernoulli). The valid token has teacher probability p, warm-start
(= G-OPD reference π_ref) probability b and student probability q; θ = logit q. G-OPD advantages
(lit_opd/methods/opd/README.md, "G-OPD reward extrapolation λ"; ``objectives.gopd_advantage``):

    A(1) = λ(ln p − ln b) − (ln q − ln b),   A(0) = λ(ln(1−p) − ln(1−b)) − (ln(1−q) − ln(1−b))
    g(θ) = E_{y~q}[A(y) ∇_θ ln q(y)] = q(1−q)[A(1) − A(0)] = q(1−q)[λ D − (θ − logit b)],
    D = logit p − logit b.

g = 0 gives the fixed point logit q*(λ) = logit b + λ D, i.e. q* ∝ b^{1−λ} p^λ (the G-OPD optimum).
An IS/PPO clip of strength c keeps likelihood ratios to an anchor a inside [1−c, 1+c]:
head q/a ≤ 1+c and tail (1−q)/(1−a) ≥ 1−c. The threshold λ* is the smallest λ at which q*(λ)
reaches the boundary:

    base anchor (a = b):    λ* = [logit(1 − (1−c)(1−b)) − logit b] / D
                               = [ln(1 + c(1−b)/b) − ln(1−c)] / ln(p(1−b) / (b(1−p)))
                            and, if b < 1/(1+c), also the head root q = (1+c) b; take the smaller.
    teacher anchor (a = p): λ*_T = 1 + [logit(1 − (1−c)(1−p)) − logit p] / D   (head root likewise).

The head root b + cb comes before the tail root b + c(1−b) only when b < 1/2 (for the base anchor).
Properties: λ* > 1 ⇔ (1−p)/(1−b) > 1−c when the tail binds (b ≥ 1/2); with p, b → 1 at fixed
ρ = (1−p)/(1−b), λ* → ln(1−c)/ln ρ. K-ary: q*_k(λ) = softmax_k((1−λ) ln b_k + λ ln p_k); the
threshold is found by bisection on the class-mass predicate (see :func:`lambda_star_kary`).

Two-sided band (``two_sided=True``, our extension; the one-sided derivation above assumes p > b):
where the teacher is *less* certain than the warm start (p < b), q*(λ) falls with λ and its tail
grows past the teacher's for λ > 1 — toward invalid outputs. The same band then binds from the other
side: tail (1−q)/(1−a) ≤ 1+c, i.e. q = 1 − (1+c)(1−a), or head q/a ≥ 1−c; λ* is the first root
reached. The K-ary predicate of :func:`lambda_star_kary` already checks both sides; two-sided,
:func:`lambda_star` equals it in the Bernoulli-exact case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lit_opd.errors import SettingError

ANCHORS = ("base", "teacher")


def _check_open_unit(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise SettingError(f"{name}={value!r} must lie strictly between 0 and 1")


def _logit(x: float) -> float:
    return math.log(x) - math.log1p(-x)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def q_star(p: float, b: float, lambda_: float) -> float:
    """Bernoulli G-OPD fixed point: logit q* = logit b + λ (logit p − logit b)."""
    _check_open_unit("p", p)
    _check_open_unit("b", b)
    return _sigmoid(_logit(b) + lambda_ * (_logit(p) - _logit(b)))


def tail_ratio(q: float, b: float) -> float:
    """Tail likelihood ratio (1−q)/(1−b); the base-relative clip keeps it ≥ 1−c."""
    _check_open_unit("b", b)
    return (1.0 - q) / (1.0 - b)


def _logit_tail_root(a: float, c: float) -> float:
    """logit of q_c = 1 − (1−c)(1−a), computed from ln(1−q_c) = ln(1−c) + ln(1−a) for p, b ≈ 1."""
    log_tail = math.log1p(-c) + math.log1p(-a)
    return math.log(-math.expm1(log_tail)) - log_tail


def lambda_star(p: float, b: float, c: float, anchor: str = "base", two_sided: bool = False) -> float:
    """Smallest λ at which the Bernoulli fixed point q*(λ) leaves the clip band of the anchor.

    λ* = min over the binding roots q_r of [logit q_r − logit b] / [logit p − logit b], with
    q_r = 1 − (1−c)(1−a) (tail) and, when a < 1/(1+c), q_r = (1+c) a (head); a = b for
    ``anchor="base"``, a = p for ``anchor="teacher"`` (README.md here, "The cliff λ*").
    ``two_sided``: where p < b use the band's other edges, q_r = 1 − (1+c)(1−a) (when positive)
    and q_r = (1−c) a; p = b gives +inf (q* does not move with λ).

    Raises:
        ValueError: unless 0 < p, b, c < 1, and (one-sided) b < p: only then does λ push q* toward
            the lower tail edge the one-sided band watches.
    """
    _check_open_unit("p", p)
    _check_open_unit("b", b)
    _check_open_unit("c", c)
    if not b < p and not two_sided:
        raise SettingError(
            f"lambda_star needs b < p, got b={b!r}, p={p!r}: the teacher must put more mass on the valid "
            "token than the warm start, otherwise extrapolation does not move q* toward the tail boundary "
            "(two_sided=True also watches the upper edge)"
        )
    if anchor not in ANCHORS:
        raise SettingError(f"anchor={anchor!r}: use one of {', '.join(ANCHORS)}")
    if p == b:
        return math.inf
    a = b if anchor == "base" else p
    if p > b:
        roots = [_logit_tail_root(a, c)]
        if (1.0 + c) * a < 1.0:
            roots.append(_logit((1.0 + c) * a))
    else:
        roots = [_logit((1.0 - c) * a)]
        if (1.0 + c) * (1.0 - a) < 1.0:
            roots.append(_logit(1.0 - (1.0 + c) * (1.0 - a)))
    logit_b, gap = _logit(b), _logit(p) - _logit(b)
    return min((root - logit_b) / gap for root in roots)


def gopd_bernoulli_gradient(q: float, p: float, b: float, lambda_: float) -> float:
    """Expected G-OPD policy gradient wrt θ = logit q: g = q(1−q)[A(1) − A(0)] (README.md, "The cliff λ*").

    A(1) = λ(ln p − ln b) − (ln q − ln b);  A(0) = λ(ln(1−p) − ln(1−b)) − (ln(1−q) − ln(1−b)).
    Positive below q*(λ), zero at q*(λ), negative above it.
    """
    for name, value in (("q", q), ("p", p), ("b", b)):
        _check_open_unit(name, value)
    adv_1 = lambda_ * (math.log(p) - math.log(b)) - (math.log(q) - math.log(b))
    adv_0 = lambda_ * (math.log1p(-p) - math.log1p(-b)) - (math.log1p(-q) - math.log1p(-b))
    return q * (1.0 - q) * (adv_1 - adv_0)


def _as_distribution(name: str, probs: Sequence[float] | Tensor) -> Tensor:
    probs_K = torch.as_tensor(probs, dtype=torch.float64)
    if probs_K.dim() != 1 or probs_K.numel() < 2:
        shape = tuple(probs_K.shape)
        raise SettingError(f"{name} must be a 1-D distribution over K >= 2 classes, got shape {shape}")
    if not bool((probs_K > 0).all()) or abs(float(probs_K.sum()) - 1.0) > 1e-6:
        raise SettingError(f"{name} must be strictly positive and sum to 1, got {probs_K.tolist()}")
    return probs_K


def q_star_kary(p_K: Sequence[float] | Tensor, b_K: Sequence[float] | Tensor, lambda_: float) -> Tensor:
    """K-ary G-OPD fixed point q*_k(λ) = softmax_k((1−λ) ln b_k + λ ln p_k), float64 (K,)."""
    p_K, b_K = _as_distribution("p_K", p_K), _as_distribution("b_K", b_K)
    if p_K.shape != b_K.shape:
        raise SettingError(f"p_K has {p_K.numel()} classes but b_K has {b_K.numel()}")
    return torch.softmax((1.0 - lambda_) * b_K.log() + lambda_ * p_K.log(), dim=-1)


def _class_safe(q_K: Tensor, valid_K: Tensor, b_valid: float, c: float) -> bool:
    """Both class ratios Q_C/B_C and (1−Q_C)/(1−B_C) lie inside [1−c, 1+c]."""
    q_valid = float(q_K[valid_K].sum())
    ratios = (q_valid / b_valid, (1.0 - q_valid) / (1.0 - b_valid))
    return all(1.0 - c <= r <= 1.0 + c for r in ratios)


def lambda_star_kary(
    p_K: Sequence[float] | Tensor,
    b_K: Sequence[float] | Tensor,
    valid_ids: Sequence[int],
    c: float,
    lo: float = 0.0,
    hi: float = 50.0,
    tol: float = 1e-10,
) -> float:
    """Largest λ in [lo, hi] whose K-ary fixed point keeps the binding class clip-safe (bisection).

    Safe(λ): with Q_C = Σ_{k∈C} q*_k(λ) and B_C = Σ_{k∈C} b_k for the valid class C = ``valid_ids``,
    both Q_C/B_C and (1−Q_C)/(1−B_C) lie in [1−c, 1+c]. When p_k/b_k is constant within C and
    within its complement this equals :func:`lambda_star` (p_C, B_C, c).

    Assumes the safe set is an interval [lo, λ*]: true when Q_C(λ) is monotone in λ, which holds in
    the Bernoulli-exact case and when a single binding class dominates (README.md here, "K-ary bisection").
    Bisection then returns λ* to within ``tol``.

    Raises:
        ValueError: bad distributions, ids or c; the predicate fails at ``lo``; or it still holds at
            ``hi`` (widen ``hi``).
    """
    p_K, b_K = _as_distribution("p_K", p_K), _as_distribution("b_K", b_K)
    _check_open_unit("c", c)
    if not lo < hi:
        raise SettingError(f"lambda_star_kary needs lo < hi, got lo={lo!r}, hi={hi!r}")
    if not valid_ids or len(set(valid_ids)) != len(valid_ids) or len(valid_ids) >= p_K.numel():
        raise SettingError(f"valid_ids={list(valid_ids)!r} must be distinct and leave a non-empty complement")
    if not all(0 <= k < p_K.numel() for k in valid_ids):
        raise SettingError(f"valid_ids={list(valid_ids)!r} must index the {p_K.numel()} classes")
    valid_K = torch.zeros(p_K.numel(), dtype=torch.bool)
    valid_K[list(valid_ids)] = True
    b_valid = float(b_K[valid_K].sum())

    def safe(lam: float) -> bool:
        return _class_safe(q_star_kary(p_K, b_K, lam), valid_K, b_valid, c)

    if not safe(lo):
        raise SettingError(f"the clip-safe predicate already fails at lo={lo!r}; lower lo")
    if safe(hi):
        raise SettingError(f"the clip-safe predicate still holds at hi={hi!r}; raise hi")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if safe(mid) else (lo, mid)
    return lo
