"""OPDModule on hand-built RolloutBatches: the loss is the divergence it claims to be, matches
TRL's GKD loss, self-distillation is zero, and bad settings fail at construction."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from lit_opd import HFTeacher, OPDModule, RolloutBatch, TeacherCapability, TeacherOutput
from lit_opd.objectives import divergences as D
from lit_opd.teachers import Teacher
from lit_opd.tasks import char_tokenizer
from tests.helpers import make_tiny_model


def _batch(tok, prompts=("12+3=", "4+56="), completions=("51", "06")) -> RolloutBatch:
    p = tok(list(prompts), padding=True, return_tensors="pt")
    c = [tok(x, add_special_tokens=False).input_ids + [tok.eos_token_id] for x in completions]
    T = max(map(len, c))
    ids = torch.zeros(len(c), T, dtype=torch.long)
    mask = torch.zeros(len(c), T, dtype=torch.bool)
    for i, row in enumerate(c):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return RolloutBatch(p.input_ids, p.attention_mask, ids, mask, torch.full(ids.shape, -1.0), [None] * len(c),
                        torch.arange(len(c)))


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _module(tok, teacher_seed=1, **kwargs):
    student = make_tiny_model(len(tok), 32, 2, seed=0)
    teacher = HFTeacher(make_tiny_model(len(tok), 32, 2, seed=teacher_seed), tokenizer=tok)
    return OPDModule(student, teacher, tokenizer=tok, **kwargs)


def _full_logits(model, batch):
    pos = batch.position_ids_BL
    return model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL, position_ids=pos).logits


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_divergence_loss_matches_trl_gkd_loss(tok, beta):
    trl_gkd = pytest.importorskip("trl.experimental.gkd")
    module = _module(tok, beta=beta)
    batch = _batch(tok)
    loss, _ = module.loss(batch, module.teacher.score(batch))
    # TRL's convention: logits of the whole sequence shifted by one, labels -100 off the completion.
    s_logits = _full_logits(module.student, batch)[:, :-1]
    with torch.no_grad():
        t_logits = _full_logits(module.teacher.model, batch)[:, :-1]
    labels = batch.input_ids_BL[:, 1:].clone()
    labels[:, : batch.prompt_len - 1] = -100
    labels[:, batch.prompt_len - 1 :][~batch.completion_mask_BT] = -100
    expected = trl_gkd.GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=labels, beta=beta)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)


def test_self_distillation_gives_zero_loss(tok):
    module = _module(tok, teacher_seed=0)  # same seed: identical weights
    batch = _batch(tok)
    for divergence in D.KINDS:
        module.divergence = divergence
        loss, metrics = module.loss(batch, module.teacher.score(batch))
        assert abs(loss.item()) < 1e-6, divergence
        assert abs(metrics["teacher_kl"].item()) < 1e-6


def test_sampled_loss_gradient_is_the_reverse_kl_reward(tok):
    """On-policy (sampler log-probs = student's), d loss / d log q_t = -A_t / N with
    A_t = -(log q_t - log p_t): the Tinker importance-sampling objective."""
    module = _module(tok, loss="sampled")
    batch = _batch(tok)
    logits = _full_logits(module.student, batch)[:, batch.prompt_len - 1 : -1]
    batch.sampler_logp_BT = D.token_logprobs(logits, batch.completion_ids_BT).detach()
    teacher_out = module.teacher.score(batch)
    loss, metrics = module.loss(batch, teacher_out)
    t_logp = D.token_logprobs(teacher_out.logits_BTV, batch.completion_ids_BT)
    adv = -(batch.sampler_logp_BT - t_logp)
    mask = batch.completion_mask_BT
    expected = -(adv * mask).sum() / mask.sum()  # ratio 1 on-policy
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert "advantage" in metrics


def test_gopd_reference_is_the_initial_student_and_is_not_saved(tok):
    module = _module(tok, loss="sampled", lambda_=1.25, estimator="ppo")
    ref = module._frozen["reference"]
    assert all(not p.requires_grad for p in ref.parameters())
    assert not any(k.startswith("_frozen") or "reference" in k for k in module.state_dict())
    with torch.no_grad():
        module.student.lm_head.weight.add_(1.0)
    assert not torch.equal(ref.lm_head.weight, module.student.lm_head.weight)
    batch = _batch(tok)
    batch.sampler_logp_BT = torch.zeros_like(batch.sampler_logp_BT) - 4.0
    loss, metrics = module.loss(batch, module.teacher.score(batch))
    assert torch.isfinite(loss) and {"clip_frac", "ratio_mean"} <= set(metrics)


def test_topk_teacher_path_with_k_equal_vocab_matches_full(tok):
    full, topk = _module(tok, beta=0.5), _module(tok, beta=0.5, top_k=len(tok))
    batch = _batch(tok)
    a, _ = full.loss(batch, full.teacher.score(batch))
    b, _ = topk.loss(batch, topk.teacher.score(batch))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gkd_draw_is_seeded_by_step_and_follows_lmbda(tok):
    module = _module(tok, lmbda=0.3, seed=7)
    draws = [_draw(module, step) for step in range(300)]
    assert draws == [_draw(module, s) for s in range(300)]  # same step, same choice (every rank)
    frac = draws.count("student") / 300
    assert 0.22 < frac < 0.38 and set(draws) == {"student", "dataset"}
    assert _draw(_module(tok, lmbda=1.0), 5) == "student"


def _draw(module, step):
    """completion_source() at a given global step (a read-only Trainer property otherwise)."""
    type(module).global_step = property(lambda self: step)
    try:
        return module.completion_source()
    finally:
        del type(module).global_step


class TextOnlyTeacher(Teacher):
    capability: ClassVar[TeacherCapability] = TeacherCapability.TEXT_ONLY

    def score(self, batch):  # pragma: no cover - never called
        return TeacherOutput()

    def identity(self):
        return {"class": "TextOnlyTeacher"}


def test_capability_mismatch_fails_at_construction(tok):
    with pytest.raises(ValueError, match="needs a teacher with capability FULL_LOGITS.*provides TEXT_ONLY"):
        OPDModule(make_tiny_model(len(tok)), TextOnlyTeacher(), tokenizer=tok)
    with pytest.raises(ValueError, match="TOKEN_LOGPROBS"):
        OPDModule(make_tiny_model(len(tok)), TextOnlyTeacher(), tokenizer=tok, loss="sampled")


def test_tokenizer_mismatch_names_the_difference(tok):
    other = char_tokenizer()
    other.add_tokens(["<think>"])
    teacher = HFTeacher(make_tiny_model(len(other)), tokenizer=other)
    with pytest.raises(ValueError, match=r"only in teacher \['<think>'\]"):
        OPDModule(make_tiny_model(len(tok)), teacher, tokenizer=tok)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"beta": 1.5}, "beta=1.5 must be in"), ({"loss": "kl"}, "loss='kl'"), ({"divergence": "l2"}, "'l2'"),
     ({"temperature": 0.0}, "temperature=0.0"), ({"loss": "sampled", "lmbda": 0.5}, "lmbda < 1"),
     ({"top_k": 0}, "top_k=0")],
)
def test_bad_settings_name_the_setting(tok, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _module(tok, **kwargs)


def test_checkpoint_holds_only_the_student(tok):
    module = _module(tok, loss="sampled", lambda_=1.5)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(k.startswith("student.") for k in checkpoint["state_dict"])
    assert checkpoint["lit_opd"]["teacher"]["class"] == "HFTeacher"
    assert "tokenizer.json" in checkpoint["lit_opd"]["tokenizer_files"]
    other = _module(tok, teacher_seed=2, loss="sampled", lambda_=1.5)
    other.teacher.name = "another-teacher"
    with pytest.raises(ValueError, match="allow_teacher_change"):
        other.on_load_checkpoint(checkpoint)
