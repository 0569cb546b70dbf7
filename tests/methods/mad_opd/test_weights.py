"""MAD-OPD's math against the hand values of the method's README: confidence weights, the mixture of
per-teacher divergences, the per-teacher alignment, fixed weights and the batch reduction."""

from __future__ import annotations

import math

import pytest
import torch

from lit_opd.methods.mad_opd.debate import last_confidence
from lit_opd.methods.mad_opd.weights import (
    confidence_weights, covered_mask, fixed_weights, mix, reduce_samples, sample_divergences,
)
from lit_opd.objectives import Divergence
from lit_opd.objectives import divergences as D
from lit_opd.types import TeacherOutput

S, A = torch.tensor([0.8, 0.2]), torch.tensor([0.5, 0.5])


def test_confidence_weights_hand_values():
    w = confidence_weights(torch.tensor([[80.0, 60.0], [80.0, float("nan")]], dtype=torch.float64))
    expected = torch.tensor([0.549834, 0.450166], dtype=torch.float64)
    torch.testing.assert_close(w[0], expected, atol=1e-6, rtol=0)
    assert w[1].tolist() == [0.5, 0.5]  # a missing tag: uniform
    sharper = confidence_weights(torch.tensor([[80.0, 60.0]], dtype=torch.float64), tau=0.1)
    assert sharper[0, 0] > w[0, 0]


def test_the_last_confidence_tag_counts():
    assert last_confidence("<<CONFIDENCE=20>> then ... final <<CONFIDENCE=85>>") == 85.0
    assert last_confidence("I am 90% sure, CONFIDENCE=90") is None and last_confidence(None) is None
    assert last_confidence("<<CONFIDENCE=250>>") == 100.0  # N is 0..100


@pytest.mark.parametrize("kind, beta, ell_a, loss", [("jsd", 0.5, 0.050672, 0.027861),
                                                     ("jsd", 1.0, 0.192745, 0.105978),
                                                     ("reverse_kl", 0.5, 0.192745, 0.105978)])
def test_hand_loss_one_position_two_teachers(kind, beta, ell_a, loss):
    student_BTV = S.log()[None, None].requires_grad_(True)  # logits = log-probs: softmax gives them back
    teachers = [TeacherOutput(logits_BTV=A.log()[None, None]), TeacherOutput(logits_BTV=S.log()[None, None])]
    cover_BT = torch.ones(1, 1, dtype=torch.bool)
    div = Divergence(kind=kind, beta=beta)
    ell_BK = torch.stack([sample_divergences(student_BTV, t, cover_BT, div, 1.0) for t in teachers], -1)
    assert ell_BK[0, 0].item() == pytest.approx(ell_a, abs=1e-6) and abs(ell_BK[0, 1].item()) < 1e-7
    w_BK = confidence_weights(torch.tensor([[80.0, 60.0]]))
    loss_B, wbar_BK = mix(ell_BK, w_BK, torch.ones(1, 2, dtype=torch.bool))
    assert loss_B.item() == pytest.approx(loss, abs=1e-6)
    total, kept_B = reduce_samples(loss_B, torch.tensor([1]), "seq_mean")
    assert total.item() == pytest.approx(loss, abs=1e-6) and kept_B.tolist() == [True]
    total.backward()
    assert student_BTV.grad.abs().sum() > 0


def test_alignment_averages_each_teacher_over_its_own_positions():
    """T_A = 3 and T_student = 5: ℓ_A averages 3 positions; teacher B (T_B = 5) all 5."""
    torch.manual_seed(0)
    student_BTV, teacher_BTV = torch.randn(1, 5, 7), torch.randn(1, 5, 7)
    per_token_T = D.rows_divergence(student_BTV, teacher_BTV, "jsd", 0.5, 0.1, 1.0)[0]
    mask_BT = torch.ones(1, 5, dtype=torch.bool)
    out, div = TeacherOutput(logits_BTV=teacher_BTV), Divergence()
    ell_a = sample_divergences(student_BTV, out, covered_mask(mask_BT, torch.tensor([3])), div, 1.0)
    ell_b = sample_divergences(student_BTV, out, covered_mask(mask_BT, torch.tensor([5])), div, 1.0)
    assert ell_a.item() == pytest.approx(per_token_T[:3].mean().item(), rel=1e-6)
    assert ell_b.item() == pytest.approx(per_token_T.mean().item(), rel=1e-6)
    assert ell_a.item() != pytest.approx(ell_b.item())


def test_topk_path_with_k_equal_vocab_matches_the_full_one():
    torch.manual_seed(1)
    student_BTV, teacher_BTV = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    cover_BT = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = TeacherOutput(logits_BTV=teacher_BTV)
    full = sample_divergences(student_BTV, out, cover_BT, Divergence(), 1.0)
    topk = sample_divergences(student_BTV, out, cover_BT, Divergence(top_k=6), 1.0)
    torch.testing.assert_close(topk, full, atol=1e-5, rtol=1e-5)


def test_a_failed_teacher_gets_weight_zero_and_the_others_are_renormalised():
    ell_BK = torch.tensor([[0.2, float("nan")], [0.3, 0.1], [0.5, 0.7]])  # filler where a teacher failed
    valid_BK = torch.tensor([[True, False], [True, True], [False, False]])
    loss_B, wbar_BK = mix(ell_BK, torch.tensor([[0.25, 0.75]] * 3), valid_BK)
    assert wbar_BK.tolist() == [[1.0, 0.0], [0.25, 0.75], [0.0, 0.0]]
    torch.testing.assert_close(loss_B, torch.tensor([0.2, 0.3 * 0.25 + 0.1 * 0.75, 0.0]))


def test_samples_at_or_below_1e_8_are_skipped_and_counted():
    loss_B = torch.tensor([0.4, 1e-9, 0.2, 0.0], requires_grad=True)
    tokens_B = torch.tensor([1, 5, 3, 2])
    seq, kept_B = reduce_samples(loss_B, tokens_B, "seq_mean")
    assert kept_B.tolist() == [True, False, True, False] and seq.item() == pytest.approx(0.3)
    tok, _ = reduce_samples(loss_B, tokens_B, "token_mean")
    assert tok.item() == pytest.approx((0.4 * 1 + 0.2 * 3) / 4)
    total, _ = reduce_samples(loss_B, tokens_B, "sum")
    assert total.item() == pytest.approx(0.4 + 0.6)
    none, kept_B = reduce_samples(torch.zeros(2, requires_grad=True), tokens_B[:2], "seq_mean")
    assert none.item() == 0.0 and not kept_B.any() and none.requires_grad


def test_fixed_weights_are_checked_and_normalised():
    assert fixed_weights({"a": 3, "b": 1}, ["a", "b"], "M") == {"a": 0.75, "b": 0.25}
    assert fixed_weights(None, ["a", "b", "c"], "M") == {n: pytest.approx(1 / 3) for n in "abc"}
    for weights, message in [({"a": 1}, r"missing \['b'\]"), ({"a": 1, "b": 1, "z": 1}, r"unknown \['z'\]"),
                             ({"a": -1, "b": 1}, "finite number >= 0"), ({"a": math.inf, "b": 1}, "finite"),
                             ({"a": 0, "b": 0}, "all 0")]:
        with pytest.raises(ValueError, match=message):
            fixed_weights(weights, ["a", "b"], "M")
