"""The memory-lean loss path equals the logits path: values, gradients, and inside OPDModule."""

from __future__ import annotations

import pytest
import torch

from lit_opd.objectives import divergences as D
from lit_opd.models import plain_head
from lit_opd.objectives.lean import hidden_divergence
from lit_opd.objectives import Divergence, SampledReward
from tests.helpers import make_module, make_rollout_batch, make_tiny_model


def _inputs(seed=0, B=3, T=5, H=8, V=13):
    g = torch.Generator().manual_seed(seed)
    s_h = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    s_w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    t_h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    t_w = torch.randn(V, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    return s_h, s_w, t_h, t_w, ids, mask


@pytest.mark.parametrize("kind", D.KINDS)
@pytest.mark.parametrize("reduction", D.REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_hidden_path_equals_logits_path(kind, reduction, chunk_size):
    s_h, s_w, t_h, t_w, ids, mask = _inputs()
    terms = hidden_divergence(s_h, s_w, t_h, t_w, ids, mask, kind=kind, beta=0.3, reduction=reduction,
                              chunk_size=chunk_size, temperature=0.7)
    grads = torch.autograd.grad(terms.loss, (s_h, s_w))
    s_logits, t_logits = s_h @ s_w.T, t_h @ t_w.T
    ref = D.logits_divergence(s_logits, t_logits, kind=kind, beta=0.3, mask=mask, reduction=reduction,
                              temperature=0.7)
    ref_logp = torch.where(mask, D.token_logprobs(s_logits, ids), 0.0)
    ref_grads = torch.autograd.grad(ref, (s_h, s_w), retain_graph=True)
    torch.testing.assert_close(terms.loss, ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(terms.student_logp_BT, ref_logp, atol=1e-10, rtol=1e-9)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    with torch.no_grad():
        t_logp = torch.where(mask, D.token_logprobs(t_logits, ids), 0.0)
        torch.testing.assert_close(terms.teacher_logp_BT, t_logp, atol=1e-10, rtol=1e-9)
        entropy = torch.where(mask, D.entropy(s_logits), 0.0)
        torch.testing.assert_close(terms.entropy_BT, entropy, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_sampled_terms_give_token_logprobs_with_gradient(chunk_size):
    s_h, s_w, t_h, t_w, ids, mask = _inputs()
    terms = hidden_divergence(s_h, s_w, t_h, t_w, ids, mask, kind=None, chunk_size=chunk_size)
    assert terms.loss.item() == 0.0
    grads = torch.autograd.grad(terms.student_logp_BT.sum(), (s_h, s_w))
    ref_logp = torch.where(mask, D.token_logprobs(s_h @ s_w.T, ids), 0.0)
    ref_grads = torch.autograd.grad(ref_logp.sum(), (s_h, s_w))
    torch.testing.assert_close(terms.student_logp_BT, ref_logp, atol=1e-10, rtol=1e-9)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


def test_all_masked_gives_zero_and_backward_works():
    s_h, s_w, t_h, t_w, ids, mask = _inputs()
    terms = hidden_divergence(s_h, s_w, t_h, t_w, ids, torch.zeros_like(mask), chunk_size=2)
    assert terms.loss.item() == 0.0
    terms.loss.backward()
    assert s_h.grad is not None and torch.count_nonzero(s_h.grad) == 0


def test_plain_head_detection(char_tok):
    model = make_tiny_model(len(char_tok))
    assert plain_head(model)
    model.config.final_logit_softcapping = 30.0  # Gemma-style: logits != lm_head(hidden)
    assert not plain_head(model)


@pytest.mark.parametrize("objective", [Divergence, SampledReward])
def test_opd_module_lean_path_matches_logits_path(char_tok, objective):
    def module(chunk_size):
        settings = {"beta": 0.5} if objective is Divergence else {}
        return make_module(char_tok, objective=objective(chunk_size=chunk_size, **settings))

    lean, full = module(3), module(None)
    batch = make_rollout_batch(char_tok)
    lean_out = lean.score_teacher(batch)
    assert lean_out.hidden_BTH is not None and lean_out.logits_BTV is None
    a, metrics_a = lean.loss(batch, lean_out)
    b, metrics_b = full.loss(batch, full.score_teacher(batch))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for key in ("teacher_kl", "entropy"):
        torch.testing.assert_close(metrics_a[key], metrics_b[key], atol=1e-5, rtol=1e-5)
    a.backward()
    b.backward()
    for (name, p), q in zip(lean.student.named_parameters(), full.student.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
