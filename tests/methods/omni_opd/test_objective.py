"""SpeculativeVerification's loss on tiny models: the anchor (zero against itself, a full-vocabulary
KL otherwise), the loss against a from-definition computation under both reductions, the direction
of the chunk gradient, and one clear error per bad setting."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_opd.methods.omni_opd import OmniOPDModule, SpeculativeVerification, anchor_kl
from lit_opd.methods.omni_opd.objective import AnchorTerms, Verdicts
from lit_opd.models import completion_logits
from lit_opd.objectives import divergences as D
from lit_opd.teachers.text import HFTextTeacher
from tests.helpers import make_rollout_batch, make_tiny_model

PROMPTS, COMPLETIONS = ("12+3=", "4+56=", "7+8="), ("51", "06", "5123")


def _module(tok, perturb: float = 0.0, **objective) -> OmniOPDModule:  # noqa: ANN001
    teacher = HFTextTeacher(make_tiny_model(len(tok), 32, 2, seed=1), tokenizer=tok)
    module = OmniOPDModule(make_tiny_model(len(tok), 32, 2, seed=0), teacher, tokenizer=tok,
                           objective=SpeculativeVerification(**{"chunk_tokens": 2, **objective}))
    if perturb:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in module.student.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=gen))
    return module


def _terms(module: OmniOPDModule, batch) -> AnchorTerms:  # noqa: ANN001
    logits_BTV = completion_logits(module.student, batch)
    with torch.no_grad():
        ref_BTV = completion_logits(module.reference, batch)
    return AnchorTerms(D.token_logprobs(logits_BTV, batch.completion_ids_BT), logits_BTV, ref_BTV,
                       D.entropy(logits_BTV.detach()))


def _verdicts(rows, starts, k_sem, answered) -> Verdicts:  # noqa: ANN001
    return Verdicts(rows=list(rows), starts=list(starts), k_sem_A=torch.tensor(k_sem, dtype=torch.float),
                    answered_A=torch.tensor(answered, dtype=torch.float), requested=len(rows))


def test_anchor_is_zero_when_the_student_is_the_reference(char_tok):
    module = _module(char_tok)
    batch = make_rollout_batch(char_tok, PROMPTS, COMPLETIONS)
    terms = _terms(module, batch)
    assert anchor_kl(terms.student_logits_BTV, terms.reference_logits_BTV).abs().max().item() == 0.0
    loss, metrics = module.objective(batch, terms, Verdicts())  # no audit: the loss is the anchor alone
    assert loss.item() == 0.0 and metrics["anchor_kl"].item() == 0.0
    assert loss.requires_grad


def test_anchor_equals_a_manual_full_vocabulary_kl(char_tok):
    module = _module(char_tok, perturb=0.05)
    batch = make_rollout_batch(char_tok, PROMPTS, COMPLETIONS)
    terms = _terms(module, batch)
    ref_logp = terms.reference_logits_BTV.double().log_softmax(-1)
    student_logp = terms.student_logits_BTV.detach().double().log_softmax(-1)
    manual_BT = (ref_logp.exp() * (ref_logp - student_logp)).sum(-1)  # KL(π_ref ‖ π_θ), every token id
    assert manual_BT[batch.loss_mask_BT].min() > 1e-4
    torch.testing.assert_close(anchor_kl(terms.student_logits_BTV, terms.reference_logits_BTV).double(),
                               manual_BT, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["seq_sum", "token_mean"])
def test_loss_equals_the_definition(char_tok, reduction):
    module = _module(char_tok, perturb=0.05, alpha=1.0, beta=0.3, reduction=reduction)
    batch = make_rollout_batch(char_tok, PROMPTS, COMPLETIONS)  # lengths 3, 3, 5 (with EOS)
    terms = _terms(module, batch)
    verdicts = _verdicts(rows=[0, 2, 2], starts=[1, 0, 3], k_sem=[3.0, 0.0, 1.5], answered=[4, 2, 4])
    loss, metrics = module.objective(batch, terms, verdicts)

    logp = terms.student_logp_BT.detach().double()
    kl = anchor_kl(terms.student_logits_BTV, terms.reference_logits_BTV).detach().double()
    audited = {(0, 1), (0, 2), (2, 0), (2, 1), (2, 3), (2, 4)}
    total, targets = 0.0, []
    for row, start, k, n in zip([0, 2, 2], [1, 0, 3], [3.0, 0.0, 1.5], [4, 2, 4]):
        chunk = logp[row, start : start + 2]
        target = (k + 1.0 * chunk.mean().exp().item()) / (n + 1.0)
        targets.append(target)
        total -= target * chunk.sum().item()
    lengths = batch.loss_mask_BT.sum(-1).tolist()
    total += 0.3 * sum(kl[b, t].item() for b in range(3) for t in range(lengths[b]) if (b, t) not in audited)
    expected = total / 3 if reduction == "seq_sum" else total / sum(lengths)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["target_mean"].item() == pytest.approx(sum(targets) / 3, rel=1e-5)
    assert metrics["ksem_zero_frac"].item() == pytest.approx(1 / 3)


def test_a_positive_target_raises_the_chunk_log_prob(char_tok):
    module = _module(char_tok, perturb=0.05, beta=0.0)
    batch = make_rollout_batch(char_tok, PROMPTS[:1], ["5123"])
    verdicts = _verdicts(rows=[0], starts=[1], k_sem=[0.5], answered=[4])

    def chunk_logp() -> float:
        with torch.no_grad():
            return _terms(module, batch).student_logp_BT[0, 1:3].sum().item()

    before = chunk_logp()
    loss, _ = module.objective(batch, _terms(module, batch), verdicts)
    grads = torch.autograd.grad(loss, list(module.student.parameters()))
    with torch.no_grad():
        for p, g in zip(module.student.parameters(), grads):
            p.sub_(0.05 * g)
    assert chunk_logp() > before


def test_the_loss_reaches_only_the_student(char_tok):
    module = _module(char_tok, perturb=0.05)
    reference = copy.deepcopy(module.reference.state_dict())
    batch = make_rollout_batch(char_tok, PROMPTS, COMPLETIONS)
    loss, _ = module.objective(batch, _terms(module, batch), _verdicts([0], [0], [1.0], [2]))
    loss.backward()
    assert all(p.grad is None for p in module.reference.parameters())
    assert all(torch.equal(v, module.reference.state_dict()[k]) for k, v in reference.items())


@pytest.mark.parametrize(("setting", "value"), [
    ("chunk_tokens", 0), ("max_audits", 0), ("num_continuations", 1.5), ("teacher_tokens", 0),
    ("alpha", -1.0), ("beta", float("nan")), ("teacher_temperature", -0.1), ("reduction", "mean"), ("baseline", True),
    ("similarity", "cosine"),
])
def test_each_bad_setting_is_named(setting, value):
    with pytest.raises(ValueError, match=f"SpeculativeVerification.{setting}"):
        SpeculativeVerification(**{setting: value})


def test_settings_are_plain_values_for_the_checkpoint():
    def exact(a: str, b: str) -> float:
        return float(a == b)

    settings = SpeculativeVerification(chunk_tokens=4, similarity=exact).settings()
    assert settings["class"] == "SpeculativeVerification" and settings["chunk_tokens"] == 4
    assert settings["similarity"].endswith("exact") and isinstance(settings["similarity"], str)
    assert SpeculativeVerification().settings()["similarity"] == "edit"
