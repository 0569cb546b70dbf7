"""OmniOPD's group objective: standardized advantages (hand values), the loss against its definition,
a positive advantage raising its candidate, the module's candidates (the sampled chunk first, fresh
ones from the same prefix, scored against the same continuations), and a short fit with the trained
teacher that never scores tokens."""

from __future__ import annotations

import pytest
import torch

from lit_opd.methods.omni_opd import GroupVerification, OmniOPDModule, standardized_advantages
from lit_opd.methods.omni_opd.group import Candidates
from lit_opd.methods.omni_opd.objective import AnchorTerms, Verdicts
from lit_opd.models import completion_logits
from lit_opd.objectives import divergences as D
from lit_opd.teachers.text import HFTextTeacher
from tests.helpers import make_rollout_batch, make_trainer
from tests.methods.omni_opd.test_module import STUDENT, SUMS, TEACHER, GenerateOnlyTeacher, _data


def test_standardized_advantages_hand_values():
    # r = (0.8, 0.4): mean 0.6, population std 0.2 -> (+1, −1); equal rewards teach nothing
    advantages = standardized_advantages(torch.tensor([[0.8, 0.4], [0.5, 0.5]]))
    assert advantages[0].tolist() == pytest.approx([1.0, -1.0], abs=1e-5)
    assert advantages[1].tolist() == [0.0, 0.0]


def _terms(module: OmniOPDModule, batch) -> AnchorTerms:  # noqa: ANN001
    logits = completion_logits(module.student, batch)
    with torch.no_grad():
        reference = completion_logits(module.reference, batch)
    return AnchorTerms(D.token_logprobs(logits, batch.completion_ids_BT), logits, reference, D.entropy(logits.detach()))


def test_loss_equals_the_definition(char_tok):
    objective = GroupVerification(candidates=2, chunk_tokens=2, max_audits=1, num_continuations=4, beta=0.0)
    module = OmniOPDModule(STUDENT, HFTextTeacher(TEACHER), objective=objective)
    batch = make_rollout_batch(module.tokenizer, list(SUMS)[:1], ["76"])
    logp_ANC = torch.log(torch.tensor([[[0.5, 0.5], [0.125, 1.0]]])).requires_grad_()
    mask_ANC = torch.tensor([[[True, True], [True, False]]])  # the fresh candidate ended after a token
    candidates = Candidates(logp_ANC, mask_ANC, torch.tensor([[3.0, 1.0]]), torch.tensor([[4.0, 4.0]]))
    verdicts = Verdicts(rows=[0], starts=[0], k_sem_A=torch.tensor([3.0]), answered_A=torch.tensor([4.0]),
                        requested=1)
    loss, metrics = objective(batch, _terms(module, batch), verdicts, candidates)
    # π̄ = (0.5, 0.125) (the second over its one token); r = ((3 + 0.5)/5, (1 + 0.125)/5) = (0.7, 0.225)
    # -> A = (+1, −1); L = −(1 · log(0.5 · 0.5) − 1 · log 0.125) / 1 sequence = −log 2
    assert loss.item() == pytest.approx(-0.693147, abs=1e-5)
    assert metrics["target_mean"].item() == pytest.approx((0.7 + 0.225) / 2)
    # the gradient pushes the first candidate's tokens up and the second's down
    (grad,) = torch.autograd.grad(loss, logp_ANC)
    assert grad[0, 0].tolist() == pytest.approx([-1.0, -1.0], abs=1e-5)
    assert grad[0, 1].tolist() == pytest.approx([1.0, 0.0], abs=1e-5)


def test_candidates_start_with_the_sampled_chunk_and_share_the_prefix():
    objective = GroupVerification(candidates=3, chunk_tokens=2, max_audits=1, num_continuations=2,
                                  teacher_temperature=0.0)
    module = OmniOPDModule(STUDENT, HFTextTeacher(TEACHER), objective=objective)
    batch = make_rollout_batch(module.tokenizer, list(SUMS), ["76", "15", "001"])
    verdicts = module.verify(batch, [[0], [0], [1]])
    candidates = module.candidates(batch, verdicts)
    A, N, C = candidates.logp_ANC.shape
    assert (A, N, C) == (3, 3, 2)
    # the sampled chunk's log-probs are the rollout's own at those positions
    rollout_logp = D.token_logprobs(completion_logits(module.student, batch), batch.completion_ids_BT)
    torch.testing.assert_close(candidates.logp_ANC[0, 0], rollout_logp[0, :2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(candidates.logp_ANC[2, 0], rollout_logp[2, 1:3], rtol=1e-4, atol=1e-5)
    # the sampled chunk scores what verify() gave it; every candidate is compared with both answers
    assert candidates.k_sem_AN[:, 0].tolist() == verdicts.k_sem_A.tolist()
    assert candidates.answered_AN.tolist() == [[2.0] * 3] * 3
    assert candidates.logp_ANC.requires_grad and bool((candidates.logp_ANC <= 0).all())


def test_a_short_group_fit_moves_the_student_and_never_scores_the_teacher(tmp_path):
    teacher = GenerateOnlyTeacher(TEACHER)
    objective = GroupVerification(candidates=3, chunk_tokens=2, max_audits=2, num_continuations=3)
    module = OmniOPDModule(STUDENT, teacher, objective=objective,
                           optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = make_trainer(tmp_path, 2)
    trainer.fit(module, _data())
    assert trainer.global_step == 2 and teacher.calls == 2
    assert any(not torch.equal(before[k], v) for k, v in module.student.state_dict().items())
    logged = trainer.callback_metrics
    assert 0.0 <= float(logged["train/dead_audit_frac"]) <= 1.0 and float(logged["train/anchor_kl"]) >= 0


@pytest.mark.parametrize(("setting", "value"), [("candidates", 1), ("candidate_temperature", 0.0)])
def test_bad_group_settings_are_named(setting, value):
    with pytest.raises(ValueError, match=f"GroupVerification.{setting}"):
        GroupVerification(**{setting: value})
