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
from lit_opd.objectives import Divergence, SampledReward
from tests.helpers import make_module, make_rollout_batch, make_tiny_model


def _batch(tok, **kwargs) -> RolloutBatch:  # noqa: ANN003
    return make_rollout_batch(tok, **kwargs)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _module(tok, teacher_seed=1, **kwargs):
    return make_module(tok, teacher_seed=teacher_seed, **kwargs)


def _full_logits(model, batch):
    pos = batch.position_ids_BL
    return model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL, position_ids=pos).logits


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_divergence_loss_matches_trl_gkd_loss(tok, beta):
    trl_gkd = pytest.importorskip("trl.experimental.gkd")
    module = _module(tok, objective=Divergence(beta=beta))
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
    module = _module(tok, objective=SampledReward())
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
    module = _module(tok, objective=SampledReward(lambda_=1.25, estimator="ppo"))
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
    full, topk = _module(tok, objective=Divergence(beta=0.5)), _module(tok, objective=Divergence(beta=0.5, top_k=len(tok)))
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
        OPDModule(make_tiny_model(len(tok)), TextOnlyTeacher(), tokenizer=tok, objective=SampledReward())


def test_tokenizer_mismatch_names_the_difference(tok):
    other = char_tokenizer()
    other.add_tokens(["<think>"])
    teacher = HFTeacher(make_tiny_model(len(other)), tokenizer=other)
    with pytest.raises(ValueError, match=r"only in teacher \['<think>'\]"):
        OPDModule(make_tiny_model(len(tok)), teacher, tokenizer=tok)


@pytest.mark.parametrize(
    "build, message",
    [(lambda: Divergence(beta=1.5), "Divergence.beta=1.5 must be in"), (lambda: Divergence(kind="l2"), "'l2'"),
     (lambda: Divergence(temperature=0.0), "Divergence.temperature=0.0"), (lambda: Divergence(top_k=0), "top_k=0"),
     (lambda: SampledReward(estimator="grpo"), "SampledReward.estimator='grpo'"),
     (lambda: Divergence(reduction="mean"), "Divergence.reduction='mean'")],
)
def test_bad_objective_settings_name_the_setting(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"objective": SampledReward(), "lmbda": 0.5}, "lmbda < 1"), ({"lmbda": 1.5}, "OPDModule.lmbda=1.5")],
)
def test_bad_settings_name_the_setting(tok, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _module(tok, **kwargs)


def test_default_objective_is_jsd_and_is_recorded(tok):
    module = _module(tok)  # the constructor's default: a lazily built Divergence()
    assert isinstance(module.objective, Divergence) and module.objective.component_class() is Divergence
    assert module.objective.settings() == {
        "class": "Divergence", "kind": "jsd", "beta": 0.5, "alpha": 0.1, "temperature": 1.0, "top_k": None,
        "chunk_size": None, "reduction": "token_mean",
    }
    batch = _batch(tok)
    explicit = _module(tok, objective=Divergence(kind="jsd", beta=0.5))
    torch.testing.assert_close(module.loss(batch, module.score_teacher(batch))[0],
                               explicit.loss(batch, explicit.score_teacher(batch))[0])


def test_loss_mask_selects_the_trained_tokens(tok):
    """Tokens outside loss_mask_BT (e.g. a tool's output inside a completion) do not enter the loss."""
    module, batch = _module(tok, objective=Divergence(beta=0.5, reduction="sum")), _batch(tok)
    teacher_out = module.score_teacher(batch)
    full, _ = module.loss(batch, teacher_out)
    batch.loss_mask_BT = batch.completion_mask_BT.clone()
    batch.loss_mask_BT[:, 0] = False
    partial, _ = module.loss(batch, teacher_out)
    first_only = batch.completion_mask_BT & ~batch.loss_mask_BT
    batch.loss_mask_BT = first_only
    first, _ = module.loss(batch, teacher_out)
    assert 0 < partial < full
    torch.testing.assert_close(partial + first, full)


def test_checkpoint_holds_only_the_student(tok):
    module = _module(tok, objective=SampledReward(lambda_=1.5))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(k.startswith("student.") for k in checkpoint["state_dict"])
    assert checkpoint["lit_opd"]["teacher"]["class"] == "HFTeacher"
    assert checkpoint["lit_opd"]["objective"] == {
        "class": "SampledReward", "estimator": "importance_sampling", "kl_coef": 1.0, "lambda_": 1.5,
        "clip_eps_low": 0.2, "clip_eps_high": 0.2, "dual_clip": 3.0, "tis_cap": 5.0, "reduction": "token_mean",
        "chunk_size": None, "is_cap": None,
    }
    assert "tokenizer.json" in checkpoint["lit_opd"]["tokenizer_files"]
    other = _module(tok, teacher_seed=2, objective=SampledReward(lambda_=1.5))
    other.teacher.name = "another-teacher"
    with pytest.raises(ValueError, match="allow_teacher_change"):
        other.on_load_checkpoint(checkpoint)
