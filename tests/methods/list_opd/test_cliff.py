"""The extrapolation-cliff threshold λ*(p,b,c) and its fixed point (lit_opd/methods/list_opd/README.md).

The hand values are computed from our own derivation ("The cliff λ*"), not the paper's; changing them
changes the recommended λ — note it in CHANGELOG.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_opd.methods.list_opd.cliff import (
    gopd_bernoulli_gradient,
    lambda_star,
    lambda_star_kary,
    q_star,
    q_star_kary,
    tail_ratio,
)
from lit_opd.objectives.sampled import gopd_advantage, ppo_clip_loss


@pytest.mark.parametrize(
    ("p", "b", "c", "anchor", "expected"),
    [
        (0.99, 0.988, 0.2, "base", 1.223636),
        (0.99, 0.9, 0.2, "base", 0.102224),
        (0.95, 0.9, 0.2, "base", 0.328048),
        (0.99, 0.9, 0.2, "teacher", 1.093900),
        (0.95, 0.9, 0.2, "teacher", 1.312648),
    ],
)
def test_lambda_star_hand_values(p, b, c, anchor, expected):
    assert lambda_star(p, b, c, anchor=anchor) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("p", "b", "c"), [(0.99, 0.988, 0.2), (0.99, 0.9, 0.2), (0.9, 0.6, 0.1), (0.6, 0.3, 0.2)]
)
def test_fixed_point_at_lambda_star_sits_on_the_clip_boundary(p, b, c):
    lam = lambda_star(p, b, c)
    q = q_star(p, b, lam)
    if b >= 0.5:  # the tail root b + c(1−b) comes before the head root b + cb
        assert tail_ratio(q, b) == pytest.approx(1 - c, abs=1e-9) and q / b < 1 + c
    else:  # (0.6, 0.3, 0.2): the head root comes first
        assert q / b == pytest.approx(1 + c, abs=1e-9) and tail_ratio(q, b) > 1 - c
    q_teacher = q_star(p, b, lambda_star(p, b, c, anchor="teacher"))
    assert (1 - q_teacher) / (1 - p) == pytest.approx(1 - c, abs=1e-9)


def test_q_star_passes_the_teacher_at_lambda_one():
    assert q_star(0.95, 0.9, 0.0) == pytest.approx(0.9)
    assert q_star(0.95, 0.9, 1.0) == pytest.approx(0.95)
    assert q_star(0.95, 0.9, 0.5) < q_star(0.95, 0.9, 1.0) < q_star(0.95, 0.9, 1.25)


@pytest.mark.parametrize("lam", [0.3, 1.0, 1.25, 2.0])
def test_gradient_vanishes_at_q_star_and_points_toward_it(lam):
    p, b = 0.95, 0.9
    q = q_star(p, b, lam)
    assert abs(gopd_bernoulli_gradient(q, p, b, lam)) < 1e-12
    assert gopd_bernoulli_gradient(q - 1e-3, p, b, lam) > 0 > gopd_bernoulli_gradient(q + 1e-3, p, b, lam)


def test_gradient_matches_gopd_advantage():
    q, p, b, lam = 0.7, 0.95, 0.9, 1.25
    adv = gopd_advantage(
        torch.tensor([[math.log(q), math.log(1 - q)]], dtype=torch.float64),
        torch.tensor([[math.log(p), math.log(1 - p)]], dtype=torch.float64),
        torch.tensor([[math.log(b), math.log(1 - b)]], dtype=torch.float64),
        lam,
    )[0]
    expected = q * (1 - q) * float(adv[0] - adv[1])
    assert gopd_bernoulli_gradient(q, p, b, lam) == pytest.approx(expected, rel=1e-12)


def test_lambda_star_above_one_iff_teacher_tail_inside_the_band():
    probs = [0.5 + 0.49 * i / 23 for i in range(24)] + [0.995, 0.999]
    checked = 0
    for c in (0.1, 0.2, 0.3):
        for p in probs:
            for b in (x for x in probs if x < p):
                rho = (1 - p) / (1 - b)
                if abs(rho - (1 - c)) < 1e-9 or abs(p / b - (1 + c)) < 1e-9:
                    continue
                above = lambda_star(p, b, c) > 1
                assert above == (rho > 1 - c and p / b < 1 + c), (p, b, c)
                if b >= 0.5:  # the tail root binds first: the README's λ* > 1 ⇔ ρ > 1 − c exactly
                    assert above == (rho > 1 - c), (p, b, c)
                    checked += 1
    assert checked > 500


@pytest.mark.parametrize(("rho", "c"), [(0.5, 0.2), (0.8333, 0.2), (0.3, 0.1)])
def test_near_deterministic_limit(rho, c):
    eps = 1e-9
    assert lambda_star(1 - rho * eps, 1 - eps, c) == pytest.approx(math.log(1 - c) / math.log(rho), rel=1e-6)


def test_kary_bisection_equals_bernoulli_when_tail_ratios_are_equal():
    p_K, b_K = [0.97, 0.02, 0.01], [0.94, 0.04, 0.02]
    lam = lambda_star_kary(p_K, b_K, valid_ids=[0], c=0.2)
    assert lam == pytest.approx(0.325477, abs=1e-6)
    assert lam == pytest.approx(lambda_star(0.97, 0.94, 0.2), abs=1e-8)
    q_K = q_star_kary(p_K, b_K, lam)
    assert float(q_K.sum()) == pytest.approx(1.0) and float(q_K[0]) == pytest.approx(q_star(0.97, 0.94, lam))
    assert torch.allclose(q_star_kary(p_K, b_K, 1.0), torch.tensor(p_K, dtype=torch.float64))


def _ascend(
    p: float, b: float, lam: float, c: float | None, steps: int, lr: float, q0: float | None = None
) -> float:
    """Gradient ascent on one logit θ (from logit q0, default b) on the exact G-OPD surrogate expectation.

    c=None: E_{y~q}[r_y A_y], r = q/q_old. Otherwise the PPO clip with behaviour = base: Σ_y b(y) ·
    min(r_y A_y, clip(r_y, 1−c, 1+c) A_y), r = q/b (``ppo_clip_loss`` with weights b(y), sum).
    """
    q0 = b if q0 is None else q0
    theta = torch.tensor(math.log(q0 / (1 - q0)), dtype=torch.float64, requires_grad=True)
    teacher_logp = torch.tensor([[math.log(p), math.log(1 - p)]], dtype=torch.float64)
    base_logp = torch.tensor([[math.log(b), math.log(1 - b)]], dtype=torch.float64)
    for _ in range(steps):
        logq = torch.stack([F.logsigmoid(theta), F.logsigmoid(-theta)]).view(1, 2)
        adv = gopd_advantage(logq.detach(), teacher_logp, base_logp, lam)
        if c is None:
            loss = -(logq.detach().exp() * torch.exp(logq - logq.detach()) * adv).sum()
        else:
            mask = torch.ones(1, 2)
            loss, _ = ppo_clip_loss(logq, base_logp, adv, mask, c, c, None, base_logp.exp(), "sum")
        (grad,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= lr * grad
    return float(torch.sigmoid(theta.detach()))


@pytest.mark.parametrize("lam", [0.5, 1.0, 1.25])
def test_dynamics_converge_to_q_star_without_clip(lam):
    p, b = 0.95, 0.9
    q = _ascend(p, b, lam, None, steps=60, lr=1 / (b * (1 - b)))
    assert q == pytest.approx(q_star(p, b, lam), abs=1e-9)


def test_base_relative_clip_is_inactive_below_lambda_star_and_binds_above():
    p, b, c = 0.95, 0.9, 0.2  # λ* = 0.328
    q = _ascend(p, b, 0.3, c, steps=40, lr=1 / (b * (1 - b)))
    assert q == pytest.approx(q_star(p, b, 0.3), abs=1e-9)
    # Above λ* the y=0 term is clipped; the rest stops where A(1) = 0, q = p^λ b^(1−λ) < q*(λ).
    q = _ascend(p, b, 0.5, c, steps=10, lr=1 / (b * (1 - b)))  # into the clipped region, then faster
    assert 1 - q < (1 - c) * (1 - b)
    q = _ascend(p, b, 0.5, c, steps=40, lr=150.0, q0=q)
    assert q == pytest.approx(math.sqrt(p * b), abs=1e-7) and q == pytest.approx(0.924662, abs=1e-6)
    assert q < q_star(p, b, 0.5) - 4e-3


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: lambda_star(1.2, 0.9, 0.2), "p=1.2"),
        (lambda: lambda_star(0.99, 0.0, 0.2), "b=0.0"),
        (lambda: lambda_star(0.99, 0.9, 1.0), "c=1.0"),
        (lambda: lambda_star(0.9, 0.95, 0.2), "b < p, got b=0.95, p=0.9"),
        (lambda: lambda_star(0.99, 0.9, 0.2, anchor="ref"), "anchor='ref'"),
        (lambda: q_star(0.99, 1.0, 1.0), "b=1.0"),
        (lambda: gopd_bernoulli_gradient(0.0, 0.99, 0.9, 1.0), "q=0.0"),
        (lambda: q_star_kary([0.5, 0.5], [0.9, 0.2], 1.0), "b_K"),
        (lambda: q_star_kary([0.5, 0.5], [0.5, 0.3, 0.2], 1.0), "p_K has 2 classes but b_K has 3"),
        (lambda: lambda_star_kary([0.97, 0.03], [0.94, 0.06], [0, 1], 0.2), "valid_ids"),
        (lambda: lambda_star_kary([0.97, 0.03], [0.94, 0.06], [0], 1.5), "c=1.5"),
        (lambda: lambda_star_kary([0.97, 0.03], [0.94, 0.06], [0], 0.2, lo=5.0, hi=6.0), "lo=5.0"),
        (lambda: lambda_star_kary([0.97, 0.03], [0.94, 0.06], [0], 0.2, hi=0.1), "hi=0.1"),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_two_sided_band_where_the_teacher_is_less_certain():
    """p < b: q*(λ) falls with λ, so the band's upper tail edge binds: (1−q*)/(1−b) = 1 + c at λ*.
    Hand value: [logit 0.94 − logit 0.95] / [logit 0.9 − logit 0.95] = 0.258164 (c = 0.2)."""
    lam = lambda_star(0.9, 0.95, 0.2, two_sided=True)
    assert lam == pytest.approx(0.2581637421, abs=1e-9)
    assert tail_ratio(q_star(0.9, 0.95, lam), 0.95) == pytest.approx(1.2, abs=1e-9)
    # the K-ary predicate checks both edges already: the Bernoulli-exact case agrees
    assert lambda_star_kary([0.9, 0.1], [0.95, 0.05], [0], 0.2) == pytest.approx(lam, abs=1e-8)
    # teacher anchor: the tail measured against the teacher's reaches 1 + c
    lam_t = lambda_star(0.9, 0.95, 0.2, anchor="teacher", two_sided=True)
    assert (1 - q_star(0.9, 0.95, lam_t)) / 0.1 == pytest.approx(1.2, abs=1e-9) and lam_t > 1
    # p > b: both readings agree; p = b: q* never moves
    assert lambda_star(0.99, 0.988, 0.2, two_sided=True) == lambda_star(0.99, 0.988, 0.2)
    assert lambda_star(0.9, 0.9, 0.2, two_sided=True) == math.inf
