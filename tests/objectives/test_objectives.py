"""Tests for lit_opd.objectives.sampled: the hand values of lit_opd/methods/opd/README.md, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from lit_opd.objectives.sampled import (
    gopd_advantage,
    importance_sampling_loss,
    mismatch_kl,
    ppo_clip_loss,
    reverse_kl_advantage,
    truncated_is_weights,
)


def _one(x: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor([[x]], dtype=torch.float64, requires_grad=grad)


MASK1 = torch.ones(1, 1, dtype=torch.bool)


def _random_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(3, 6, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    sampler = logp.detach() + 0.3 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    return logp, sampler, adv, mask


# --------------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("lambda_", "expected"), [(1.0, 0.470004), (1.25, 0.643290)])
def test_gopd_advantage_hand_values(lambda_, expected):
    old, teacher, ref = _one(math.log(0.5), True), _one(math.log(0.8)), _one(math.log(0.4))
    adv = gopd_advantage(old, teacher, ref, lambda_=lambda_)
    assert adv.item() == pytest.approx(expected, abs=1e-6)
    assert not adv.requires_grad


def test_gopd_lambda_one_is_teacher_minus_old():
    _, old, _, _ = _random_batch()
    g = torch.Generator().manual_seed(1)
    teacher, ref = -torch.rand(3, 6, generator=g).double(), -torch.rand(3, 6, generator=g).double()
    torch.testing.assert_close(gopd_advantage(old, teacher, ref, lambda_=1.0), teacher - old)


def test_reverse_kl_advantage():
    sampler, teacher = _one(math.log(0.5), True), _one(math.log(0.8), True)
    adv = reverse_kl_advantage(sampler, teacher, kl_coef=2.0)
    assert adv.item() == pytest.approx(-2.0 * math.log(0.5 / 0.8))
    assert not adv.requires_grad


# --------------------------------------------------------------------------------------------------
# PPO clip loss (lit_opd/objectives/README.md, "sampled.py")
# --------------------------------------------------------------------------------------------------
def _ppo_one(adv: float, ratio: float, **kw):
    old = _one(math.log(0.5))
    logp = _one(math.log(0.5 * ratio), grad=True)
    loss, stats = ppo_clip_loss(logp, old, _one(adv), MASK1, **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), stats


def test_ppo_positive_advantage_clipped_region():
    loss, grad, stats = _ppo_one(1.0, 1.3)
    assert loss == pytest.approx(-1.2, abs=1e-9)
    assert grad == 0.0
    assert stats["clip_frac"].item() == 1.0 and stats["clip_frac_lower"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(1.3)


def test_ppo_negative_advantage_clipped_region():
    loss, grad, stats = _ppo_one(-1.0, 0.5)  # l1 = 0.5, l2 = 0.8
    assert loss == pytest.approx(0.8, abs=1e-9)
    assert grad == 0.0 and stats["clip_frac"].item() == 1.0


def test_ppo_dual_clip():
    loss, grad, stats = _ppo_one(-1.0, 5.0)
    assert loss == pytest.approx(3.0, abs=1e-9)
    assert grad == 0.0
    assert stats["clip_frac_lower"].item() == 1.0
    loss_off, grad_off, stats_off = _ppo_one(-1.0, 5.0, dual_clip=None)
    assert loss_off == pytest.approx(5.0) and grad_off == pytest.approx(5.0)  # d(−A·r)/dlogp = −A·r
    assert stats_off["clip_frac_lower"].item() == 0.0


def test_ppo_unclipped_region_gradient():
    loss, grad, stats = _ppo_one(2.0, 1.1)
    assert loss == pytest.approx(-2.2) and grad == pytest.approx(-2.2)
    assert stats["clip_frac"].item() == 0.0


def test_ppo_asymmetric_eps():
    loss, grad, _ = _ppo_one(1.0, 1.3, eps_high=0.28)
    assert loss == pytest.approx(-1.28) and grad == 0.0


def test_ppo_is_weights_stats_and_reduction():
    logp, sampler, adv, mask = _random_batch()
    old = sampler
    w = truncated_is_weights(old, sampler - 0.5, cap=1.5)
    loss, stats = ppo_clip_loss(logp, old, adv, mask, is_weights_BT=w, reduction="sum")
    r = torch.exp(logp.detach() - old)
    l1, l2 = -adv * r, -adv * r.clamp(0.8, 1.2)
    per_tok = torch.maximum(l1, l2)
    per_tok = torch.where(adv < 0, torch.minimum(per_tok, -adv * 3.0), per_tok) * w
    assert loss.item() == pytest.approx(per_tok[mask].sum().item())
    assert stats["clip_frac"].item() == pytest.approx((l2 > l1)[mask].double().mean().item())
    assert stats["ratio_mean"].item() == pytest.approx(r[mask].mean().item())
    assert all(not v.requires_grad for v in stats.values())


def test_ppo_on_policy_gradient_equals_is_gradient():
    logp, _, adv, mask = _random_batch()
    old = logp.detach().clone()
    loss, _ = ppo_clip_loss(logp, old, adv, mask)
    (g_ppo,) = torch.autograd.grad(loss, logp)
    (g_is,) = torch.autograd.grad(importance_sampling_loss(logp, old, adv, mask), logp)
    torch.testing.assert_close(g_ppo, g_is)
    torch.testing.assert_close(g_ppo, -adv * mask / mask.sum())


# --------------------------------------------------------------------------------------------------
# importance sampling loss and truncated IS
# --------------------------------------------------------------------------------------------------
def test_is_loss_gradient_is_minus_adv_ratio_over_n():
    logp, sampler, adv, mask = _random_batch()
    loss = importance_sampling_loss(logp, sampler, adv, mask)
    r = torch.exp(logp.detach() - sampler)
    assert loss.item() == pytest.approx((-r * adv)[mask].mean().item())
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv * r * mask / mask.sum())


def test_is_loss_on_policy():
    logp, _, adv, mask = _random_batch()
    loss = importance_sampling_loss(logp, logp.detach(), adv, mask)
    assert loss.item() == pytest.approx(-adv[mask].mean().item())
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv * mask / mask.sum())


def test_is_loss_all_masked():
    logp, sampler, adv, _ = _random_batch()
    loss = importance_sampling_loss(logp, sampler, adv, torch.zeros(3, 6, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_capped_is_loss_hand_values():
    """Tokens whose engine put 0.5, 0.1 and 0.9 on what the student gives 1 (r = 2, 10, 1.11), cap 3:
    weights 2, 3, 1.11; gradient −A·min(r, C)/n per token."""
    logp = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    sampler = torch.tensor([[math.log(0.5), math.log(0.1), math.log(0.9)]], dtype=torch.float64)
    adv, mask = torch.tensor([[1.0, 1.0, -2.0]], dtype=torch.float64), torch.ones(1, 3, dtype=torch.bool)
    loss = importance_sampling_loss(logp, sampler, adv, mask, cap=3.0)
    assert loss.item() == pytest.approx((-2.0 - 3.0 + 2.0 / 0.9) / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -3.0, 2.0 / 0.9]], dtype=torch.float64) / 3)
    uncapped = importance_sampling_loss(logp.detach(), sampler, adv, mask, cap=1e9)
    assert uncapped.item() == pytest.approx(importance_sampling_loss(logp.detach(), sampler, adv, mask).item())


def test_mismatch_kl_hand_values():
    """k3 = r − 1 − log r per token, r = q_θ/q_samp: 0 where they agree, 0.5 − 1 + ln 2 at r = 1/2."""
    student = torch.tensor([[math.log(0.25), math.log(0.5), 0.0]])
    engine = torch.tensor([[math.log(0.5), math.log(0.5), 0.0]])
    mask = torch.tensor([[True, True, False]])
    assert mismatch_kl(student, engine, mask).item() == pytest.approx((0.5 - 1 + math.log(2)) / 2)
    assert mismatch_kl(engine, engine, mask).item() == 0.0


def test_truncated_is_weights_cap():
    old = torch.tensor([[0.0, 0.0, -1.0, 10.0]], requires_grad=True)
    sampler = torch.tensor([[0.0, math.log(0.5), 0.0, -100.0]])
    w = truncated_is_weights(old, sampler, cap=5.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, math.exp(-1.0), 5.0]]))
    assert not w.requires_grad


# --------------------------------------------------------------------------------------------------
# Divergence on a top-k teacher that returns more (or fewer) entries than the objective's top_k
# --------------------------------------------------------------------------------------------------
def _topk_case(teacher_k: int):
    from lit_opd.objectives.components import Divergence, TokenTerms
    from lit_opd.types import TeacherOutput
    from tests.helpers import make_rollout_batch
    from lit_opd.tasks import char_tokenizer

    tok = char_tokenizer()
    batch = make_rollout_batch(tok)
    g = torch.Generator().manual_seed(0)
    B, T = batch.completion_ids_BT.shape
    student_BTV = torch.randn(B, T, len(tok), generator=g)
    teacher_logp_BTV = torch.randn(B, T, len(tok), generator=g).log_softmax(-1)
    logp_BTK, ids_BTK = teacher_logp_BTV.topk(teacher_k, dim=-1)
    terms = TokenTerms(student_logp_BT=torch.zeros(B, T), teacher_logp_BT=torch.zeros(B, T),
                       entropy_BT=torch.zeros(B, T), student_logits_BTV=student_BTV)
    return Divergence, batch, terms, TeacherOutput(topk_logp_BTK=logp_BTK, topk_ids_BTK=ids_BTK), teacher_logp_BTV


def test_topk_divergence_uses_the_first_top_k_of_a_larger_teacher_k():
    divergence, batch, terms, wide, full_logp = _topk_case(teacher_k=9)
    from lit_opd.types import TeacherOutput

    narrow = TeacherOutput(logits_BTV=full_logp)  # a full-logit teacher: top-4 taken by the objective
    loss_wide = divergence(top_k=4)(batch, terms, wide)[0]
    loss_narrow = divergence(top_k=4)(batch, terms, narrow)[0]
    assert torch.allclose(loss_wide, loss_narrow, atol=1e-6)


def test_topk_divergence_refuses_a_teacher_with_fewer_entries():
    divergence, batch, terms, short, _ = _topk_case(teacher_k=3)
    with pytest.raises(ValueError, match="top_k=4.*only 3.*ServerTeacher.k"):
        divergence(top_k=4)(batch, terms, short)
