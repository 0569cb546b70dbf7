"""Tests for lit_opd.objectives.divergences: references from the definitions, hand values, pinned values, TRL parity."""

from __future__ import annotations

import math

import pytest
import torch

from lit_opd.objectives import divergences as D
from lit_opd.objectives.divergences import (
    KINDS,
    entropy,
    generalized_jsd,
    logits_divergence,
    per_token_divergence,
    reduce_masked,
    token_logprobs,
    topk_divergence,
)

B, T, V = 3, 5, 11
REDUCTIONS = ("token_mean", "seq_mean", "sum")


# --------------------------------------------------------------------------------------------------
# from-definition references in probability space (lit_opd/objectives/README.md, "divergences.py")
# --------------------------------------------------------------------------------------------------
def _ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return sum(p[v] * torch.log(p[v] / q[v]) for v in range(p.numel()))


def _ref_position(s: torch.Tensor, t: torch.Tensor, kind: str, beta: float, alpha: float) -> torch.Tensor:
    """One position; s, t are probability vectors."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return _ref_kl(t, s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return _ref_kl(s, t)
    if kind == "jsd":
        m = beta * t + (1 - beta) * s
        return beta * _ref_kl(t, m) + (1 - beta) * _ref_kl(s, m)
    if kind == "skew_forward_kl":
        return _ref_kl(t, alpha * t + (1 - alpha) * s)
    if kind == "skew_reverse_kl":
        return _ref_kl(s, alpha * s + (1 - alpha) * t)
    assert kind == "tvd"
    return 0.5 * sum(abs(t[v] - s[v]) for v in range(t.numel()))


def reference_loss(s_logits, t_logits, kind, mask, reduction, beta=0.5, alpha=0.1, temperature=1.0):
    """Naive loops over (b, t) in float64 probability space."""
    s_prob = torch.softmax(s_logits.double() / temperature, -1)
    t_prob = torch.softmax(t_logits.double() / temperature, -1)
    per_seq = []
    for b in range(s_logits.shape[0]):
        vals = [
            _ref_position(s_prob[b, i], t_prob[b, i], kind, beta, alpha)
            for i in range(s_logits.shape[1])
            if mask[b, i]
        ]
        per_seq.append(vals)
    flat = [v for vals in per_seq for v in vals]
    zero = s_prob.sum() * 0.0
    if reduction == "sum":
        return sum(flat, zero)
    if reduction == "token_mean":
        return sum(flat, zero) / max(len(flat), 1)
    seq_means = [sum(vals, zero) / len(vals) for vals in per_seq if vals]
    return sum(seq_means, zero) / max(len(seq_means), 1)


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (2.0 * torch.randn(B, T, V, generator=g)).to(dtype).requires_grad_(True)
    t = (2.0 * torch.randn(B, T, V, generator=g)).to(dtype)
    # row 0: prompt (2 masked) then response; row 1: padding at the end; row 2: fully masked
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    return s, t, mask


def _kind_kwargs(kind: str) -> dict:
    return {"beta": 0.3} if kind == "jsd" else {"alpha": 0.2}


# --------------------------------------------------------------------------------------------------
# hand values (one position, V=2, S=[0.8,0.2], T=[0.5,0.5])
# --------------------------------------------------------------------------------------------------
S_HAND = torch.tensor([[0.8, 0.2]]).log()
T_HAND = torch.tensor([[0.5, 0.5]]).log()


JSD_TABLE = [(0.0, 0.223144), (0.5, 0.050672), (0.9, 0.017473), (1.0, 0.192745)]


@pytest.mark.parametrize(("beta", "expected"), JSD_TABLE)
def test_jsd_hand_values(beta, expected):
    assert D.jsd(S_HAND, T_HAND, beta).item() == pytest.approx(expected, abs=1e-6)
    # same through the logits entry point (log-probs are valid logits)
    assert generalized_jsd(S_HAND[None], T_HAND[None], beta).item() == pytest.approx(expected, abs=1e-6)


def test_jsd_endpoints_are_manual_kls():
    fkl = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    rkl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert D.jsd(S_HAND, T_HAND, 0.0).item() == pytest.approx(fkl, abs=1e-7)
    assert D.jsd(S_HAND, T_HAND, 1.0).item() == pytest.approx(rkl, abs=1e-7)
    assert D.forward_kl(S_HAND, T_HAND).item() == pytest.approx(fkl, abs=1e-7)
    assert D.reverse_kl(S_HAND, T_HAND).item() == pytest.approx(rkl, abs=1e-7)


def test_other_kinds_hand_values():
    skl = 0.5 * math.log(0.5 / (0.1 * 0.5 + 0.9 * 0.8)) + 0.5 * math.log(0.5 / (0.1 * 0.5 + 0.9 * 0.2))
    srkl = 0.8 * math.log(0.8 / (0.1 * 0.8 + 0.9 * 0.5)) + 0.2 * math.log(0.2 / (0.1 * 0.2 + 0.9 * 0.5))
    assert D.skew_forward_kl(S_HAND, T_HAND, 0.1).item() == pytest.approx(skl, abs=1e-6)
    assert D.skew_reverse_kl(S_HAND, T_HAND, 0.1).item() == pytest.approx(srkl, abs=1e-6)
    assert D.total_variation(S_HAND, T_HAND).item() == pytest.approx(0.3, abs=1e-6)
    # alpha=0 skew is the plain KL; alpha=1 mixes to the reference itself -> 0
    assert D.skew_forward_kl(S_HAND, T_HAND, 0.0).item() == pytest.approx(D.forward_kl(S_HAND, T_HAND).item())
    assert D.skew_forward_kl(S_HAND, T_HAND, 1.0).item() == 0.0


def test_jsd_symmetric_bounded_by_ln2():
    s, t, _ = _inputs()
    s_logp, t_logp = torch.log_softmax(s.detach() * 5, -1), torch.log_softmax(t * 5, -1)
    vals = D.jsd(s_logp, t_logp, 0.5)
    torch.testing.assert_close(vals, D.jsd(t_logp, s_logp, 0.5))
    assert (vals <= math.log(2) + 1e-9).all() and (vals >= 0).all()


# --------------------------------------------------------------------------------------------------
# from-definition references on random inputs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_values_and_grads(kind, reduction):
    s, t, mask = _inputs()
    kw = _kind_kwargs(kind)
    out = logits_divergence(s, t, kind=kind, mask=mask, reduction=reduction, **kw)
    ref = reference_loss(s, t, kind, mask, reduction, **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    (g_out,) = torch.autograd.grad(out, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_jsd_matches_reference_fp32(beta):
    s, t, mask = _inputs(seed=1, dtype=torch.float32)
    out = generalized_jsd(s, t, beta, mask=mask)
    ref = reference_loss(s, t, "jsd", mask, "token_mean", beta=beta)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_all_masked_is_zero_with_grad(kind, chunk_size):
    s, t, _ = _inputs(dtype=torch.float32)
    mask = torch.zeros(B, T, dtype=torch.bool)
    out = logits_divergence(s, t, kind=kind, mask=mask, chunk_size=chunk_size, reduction="seq_mean")
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("kind", KINDS)
def test_identical_inputs_give_zero(kind):
    s, _, mask = _inputs(dtype=torch.float32)
    out = logits_divergence(s, s.detach().clone(), kind=kind, mask=mask, **_kind_kwargs(kind))
    assert abs(out.item()) < 1e-6


def test_temperature_scaling():
    s, t, mask = _inputs()
    out = logits_divergence(s, t, kind="jsd", beta=0.4, mask=mask, temperature=2.0)
    torch.testing.assert_close(out, logits_divergence(s / 2.0, t / 2.0, kind="jsd", beta=0.4, mask=mask))
    ref = reference_loss(s, t, "jsd", mask, "token_mean", beta=0.4, temperature=2.0)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    assert abs(out.item() - logits_divergence(s, t, beta=0.4, mask=mask).item()) > 1e-3


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_masked_positions_are_excluded(chunk_size):
    s, t, mask = _inputs(dtype=torch.float32)
    out = generalized_jsd(s, t, 0.5, mask=mask, chunk_size=chunk_size)
    s2 = s.detach().clone()
    t2 = t.clone()
    s2[~mask] = 100.0 * torch.randn_like(s2[~mask])
    t2[~mask] = -50.0
    s2.requires_grad_(True)
    out2 = generalized_jsd(s2, t2, 0.5, mask=mask, chunk_size=chunk_size)
    assert out2.item() == pytest.approx(out.item(), abs=1e-7)
    out2.backward()
    assert torch.equal(s2.grad[~mask], torch.zeros_like(s2.grad[~mask]))
    assert s2.grad[mask].abs().sum() > 0


def test_reductions_hand_example():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert reduce_masked(values, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert reduce_masked(values, mask, "seq_mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert reduce_masked(values, mask, "sum").item() == pytest.approx(10.0)
    assert reduce_masked(values).item() == pytest.approx(values.mean().item())
    # NaN/inf at masked positions never leak
    bad = values.clone()
    bad[2] = float("nan")
    assert reduce_masked(bad, mask, "seq_mean").item() == pytest.approx(3.0)


def test_invalid_arguments_raise():
    s, t, mask = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="'bogus'.*forward_kl"):
        per_token_divergence(s, t, "bogus")
    with pytest.raises(ValueError, match="'bogus'.*token_mean"):
        reduce_masked(s[..., 0], mask, "bogus")
    # padded vocabularies are compared over the ids both have; other dims must agree
    assert torch.equal(logits_divergence(s, t[..., :-1]), logits_divergence(s[..., :-1], t[..., :-1]))
    with pytest.raises(ValueError, match="more than the vocabulary dim"):
        logits_divergence(s, t[:, :-1])
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, 1.5)


# --------------------------------------------------------------------------------------------------
# chunked path
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [1, 3, 100])
@pytest.mark.parametrize("kind", ["jsd", "forward_kl", "tvd"])
def test_chunked_equals_unchunked(kind, chunk_size, reduction):
    s, t, mask = _inputs(seed=2, dtype=torch.float32)
    mask[2, 1] = True  # third row: a single valid token
    kw = dict(kind=kind, mask=mask, reduction=reduction, temperature=0.7)
    full = logits_divergence(s, t, **kw)
    (g_full,) = torch.autograd.grad(full, s)
    chunked = logits_divergence(s, t, chunk_size=chunk_size, **kw)
    (g_chunked,) = torch.autograd.grad(chunked, s)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_chunked, g_full, rtol=0, atol=1e-6)


def test_chunked_without_mask_and_recomputes_in_backward(monkeypatch):
    s, t, _ = _inputs(dtype=torch.float32)
    calls = []
    original = D.rows_divergence

    def counting(*args):
        calls.append(args[0].shape[0])
        return original(*args)

    monkeypatch.setattr(D, "rows_divergence", counting)
    out = logits_divergence(s, t, chunk_size=4)
    assert calls == [4, 4, 4, 3]  # N = B*T = 15 rows, never more than chunk_size at once
    out.backward()
    assert len(calls) == 8  # checkpoint recomputed each chunk in backward
    monkeypatch.setattr(D, "rows_divergence", original)
    torch.testing.assert_close(out, logits_divergence(s, t), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# top-k teacher
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_k_equal_v_matches_full(kind):
    s, t, mask = _inputs(seed=3, dtype=torch.float32)
    tau = 0.8
    t_logp = torch.log_softmax(t / tau, -1)
    topk_logp, topk_ids = t_logp.topk(V, dim=-1)
    kw = dict(kind=kind, mask=mask, temperature=tau, **_kind_kwargs(kind))
    full = logits_divergence(s, t, **kw)
    (g_full,) = torch.autograd.grad(full, s)
    topk = topk_divergence(s, topk_logp, topk_ids, **kw)
    (g_topk,) = torch.autograd.grad(topk, s)
    torch.testing.assert_close(topk, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_topk, g_full, rtol=0, atol=1e-5)
    renorm = topk_divergence(s, topk_logp, topk_ids, tail_bucket=False, **kw)
    torch.testing.assert_close(renorm, full, rtol=0, atol=1e-5)


def test_topk_tail_bucket_hand_values():
    s_prob = torch.tensor([0.4, 0.3, 0.2, 0.1])
    t_prob = torch.tensor([0.5, 0.25, 0.15, 0.1])
    s_logits = s_prob.log().view(1, 1, 4)
    ids = torch.tensor([1, 0]).view(1, 1, 2)  # teacher top-2, any order
    t_topk_logp = t_prob[[1, 0]].log().view(1, 1, 2)
    # tail bucket: T = [.25, .5 | .25], S = [.3, .4 | .3]
    fkl_tail = 0.5 * math.log(0.5 / 0.4) + 0.25 * math.log(0.25 / 0.3) + 0.25 * math.log(0.25 / 0.3)
    out = topk_divergence(s_logits, t_topk_logp, ids, kind="forward_kl")
    assert out.item() == pytest.approx(fkl_tail, abs=1e-6)
    tvd_tail = 0.5 * (0.1 + 0.05 + 0.05)
    assert topk_divergence(s_logits, t_topk_logp, ids, kind="tvd").item() == pytest.approx(tvd_tail, abs=1e-6)
    # renormalised: T = [1/3, 2/3], S = [3/7, 4/7]
    fkl_renorm = (2 / 3) * math.log((2 / 3) / (4 / 7)) + (1 / 3) * math.log((1 / 3) / (3 / 7))
    out = topk_divergence(s_logits, t_topk_logp, ids, kind="forward_kl", tail_bucket=False)
    assert out.item() == pytest.approx(fkl_renorm, abs=1e-6)


def test_topk_teacher_neg_inf_logp_is_finite():
    s, t, mask = _inputs(dtype=torch.float32)
    topk_logp, topk_ids = torch.log_softmax(t, -1).topk(4, dim=-1)
    topk_logp[..., -1] = float("-inf")  # a server reporting a zero-probability entry
    for kind in KINDS:
        out = topk_divergence(s, topk_logp, topk_ids, kind=kind, mask=mask)
        (g,) = torch.autograd.grad(out, s)
        assert torch.isfinite(out) and torch.isfinite(g).all()


def test_log1mexp_stable():
    x = torch.tensor([-1e-10, -1e-3, -0.5, -2.0, -50.0, 0.0, 1e-7], dtype=torch.float64)
    out = D.log1mexp(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:5], torch.log(1 - torch.exp(x[1:5])))


# --------------------------------------------------------------------------------------------------
# token-level helpers
# --------------------------------------------------------------------------------------------------
def test_token_logprobs_and_entropy():
    s, _, _ = _inputs(dtype=torch.float32)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    for tau in (1.0, 0.5):
        ref = torch.log_softmax(s / tau, -1).gather(-1, ids[..., None]).squeeze(-1)
        torch.testing.assert_close(token_logprobs(s, ids, temperature=tau), ref)
    p = torch.softmax(s, -1)
    torch.testing.assert_close(entropy(s), -(p * p.log()).sum(-1))
    assert entropy(torch.zeros(1, 1, V)).item() == pytest.approx(math.log(V), abs=1e-6)
    half = token_logprobs(s.detach().bfloat16(), ids)
    assert half.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# changing these numbers changes the objective — note it in CHANGELOG
# --------------------------------------------------------------------------------------------------
class TestPinnedValues:
    """Seed-0 values, computed once with this implementation and pinned as literals."""

    PINNED = {
        "forward_kl": 0.5927981,
        "reverse_kl": 0.6535059,
        "jsd": 0.1373754,
        "skew_forward_kl": 0.4482110,
        "skew_reverse_kl": 0.4661444,
        "tvd": 0.4415073,
    }
    PINNED_TOPK = 0.0950114

    @staticmethod
    def _data():
        torch.manual_seed(0)
        s = torch.randn(2, 4, 7)
        t = torch.randn(2, 4, 7)
        mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
        return s, t, mask

    @pytest.mark.parametrize("kind", KINDS)
    def test_kind(self, kind):
        s, t, mask = self._data()
        out = logits_divergence(s, t, kind=kind, beta=0.5, alpha=0.1, mask=mask)
        assert out.item() == pytest.approx(self.PINNED[kind], abs=1e-6)

    def test_topk(self):
        s, t, mask = self._data()
        topk_logp, topk_ids = torch.log_softmax(t, -1).topk(3, dim=-1)
        out = topk_divergence(s, topk_logp, topk_ids, kind="jsd", beta=0.5, mask=mask)
        assert out.item() == pytest.approx(self.PINNED_TOPK, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# TRL parity: GKDTrainer.generalized_jsd_loss, batchmean = token mean over valid tokens
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_trl_gkd_parity(beta, monkeypatch):
    pytest.importorskip("trl")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd")
    s, t, mask = _inputs(seed=4, dtype=torch.float32)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    labels[~mask] = -100
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, reduction="batchmean")
    (g_trl,) = torch.autograd.grad(trl_loss, s)
    ours = generalized_jsd(s, t, beta, mask=mask)
    (g_ours,) = torch.autograd.grad(ours, s)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    torch.testing.assert_close(g_ours, g_trl, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", D.KINDS)
@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (0.3, 2.0), (0.5, 1.0), (1.0, 0.7)])
def test_closed_form_gradient_equals_autograd(kind, beta, temperature):
    """rows_divergence_and_grad (closed forms for KL/JSD, autograd otherwise) against autograd."""
    g = torch.Generator().manual_seed(1)
    student = torch.randn(6, 40, dtype=torch.float64, generator=g) * 3
    teacher = torch.randn(6, 40, dtype=torch.float64, generator=g) * 3
    logits = student.clone().requires_grad_(True)
    values = D.rows_divergence(logits, teacher, kind, beta, 0.1, temperature)
    (grad,) = torch.autograd.grad(values.sum(), logits)
    closed_values, closed_grad = D.rows_divergence_and_grad(student, teacher, kind, beta, 0.1, temperature)
    torch.testing.assert_close(closed_values, values.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(closed_grad, grad, atol=1e-12, rtol=0)
