"""ListOPDModule: the base-relative PPO loss against a from-definition reference, the cliff guard
on λ, "auto" = λ* − δ, contract metrics, and a 3-step fit that logs them."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_opd import HFTeacher, RolloutBatch
from lit_opd.objectives import sampled as O
from lit_opd.methods.list_opd.calibration import binding_tail_ratios, encode_rows
from lit_opd.methods.list_opd import BaseRelativeClip, ListOPDModule, base_relative_ppo_loss
from lit_opd.objectives import Divergence
from lit_opd.rollout import ListPrompts, RolloutDataModule
from lit_opd.rollout.prompts import dataset_completions
from lit_opd.tasks import RankingTask
from lit_opd.types import SamplingParams
from tests.helpers import make_module, make_rollout_batch, make_tiny_model, make_trainer

ROWS = RankingTask(k=4).make_rows(12, seed=0)


def _module(tok, clip: float = 0.2, **kwargs) -> ListOPDModule:  # noqa: ANN003
    objective = BaseRelativeClip(clip=clip, **{k: kwargs.pop(k) for k in ("kl_coef", "tis_cap") if k in kwargs})
    return make_module(tok, cls=ListOPDModule, hidden=32, objective=objective, **kwargs)


def _batch(tok, completions: list[str], rows=ROWS, with_rows: bool = False) -> RolloutBatch:
    rows = rows[: len(completions)]
    return make_rollout_batch(tok, [r["prompt"] for r in rows], completions, answers=[r["answer"] for r in rows],
                              rows=rows if with_rows else None, sampler_logp=0.0)


def _reference_loss(q, b, p, q_samp, mask, lam, c, kappa, cap):  # noqa: ANN001, ANN202
    """lit_opd/methods/list_opd/README.md, "The objective", token by token in probability space (float64)."""
    total, clipped, n = 0.0, 0, 0
    for t in zip(*(x.flatten().tolist() for x in (q, b, p, q_samp, mask))):
        qt, bt, pt, st, m = t
        if not m:
            continue
        adv = kappa * (lam * (math.log(pt) - math.log(bt)) - (math.log(qt) - math.log(bt)))
        r = qt / bt
        w = (bt / qt) * min(qt / st, cap)
        unclipped, clip = -adv * r, -adv * min(max(r, 1 - c), 1 + c)
        total += w * max(unclipped, clip)
        clipped, n = clipped + (clip > unclipped), n + 1
    return total / n, clipped / n


def test_loss_equals_the_from_definition_base_relative_ppo_loss(char_tok):
    module = _module(char_tok, lambda_=1.3, clip=0.2, calibration_rows=0, kl_coef=0.7, tis_cap=1.5)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # student a little away from the warm start, teacher far: the clip has work to do
        for model, scale in ((module.student, 0.04), (module.teacher.model, 0.3)):
            model.lm_head.weight.add_(scale * torch.randn(model.lm_head.weight.shape, generator=gen))
    batch = _batch(char_tok, [r["answer"] for r in ROWS[:3]])
    def probs(model):  # noqa: ANN001, ANN202 - of each completion token, in float64
        out = model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL,
                    position_ids=batch.position_ids_BL)
        probs_BTV = out.logits[:, batch.prompt_len - 1 : -1].double().softmax(-1)
        return probs_BTV.gather(-1, batch.completion_ids_BT[..., None]).squeeze(-1)

    with torch.no_grad():
        q_BT, b_BT, p_BT = (probs(m) for m in (module.student, module.reference, module.teacher.model))
    noise = torch.rand(q_BT.shape, generator=torch.Generator().manual_seed(1))
    batch.sampler_logp_BT = (q_BT.log() + 0.5 * (noise - 0.5)).float()  # q_old/q_samp in [0.78, 1.28]
    loss, metrics = module.loss(batch, module.teacher.score(batch))
    expected, clip_frac = _reference_loss(q_BT, b_BT, p_BT, batch.sampler_logp_BT.double().exp(),
                                          batch.completion_mask_BT, 1.3, 0.2, 0.7, 1.5)
    assert 0 < clip_frac < 1
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert metrics["clip_frac"].item() == pytest.approx(clip_frac)
    assert {"advantage", "clip_frac_lower", "base_ratio_mean", "teacher_kl", "entropy"} <= set(metrics)


def test_gradient_is_on_policy_gopd_inside_the_band_and_zero_outside():
    b = torch.full((1, 4), 0.5).log()
    logp = torch.tensor([[0.5, 0.75, 0.75, 0.25]]).log().requires_grad_()  # q/b = 1, 1.5, 1.5, 0.5
    teacher = torch.tensor([[0.9, 0.9, 0.1, 0.1]]).log()
    sampler = logp.detach() + torch.tensor([[0.0, 0.1, -0.1, 0.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = base_relative_ppo_loss(logp, b, teacher, sampler, mask, lambda_=1.2, clip=0.2, tis_cap=5.0)
    loss.backward()
    adv = O.gopd_advantage(logp.detach(), teacher, b, 1.2)
    assert (adv[0] > 0).tolist() == [True, True, False, False]
    on_policy = -adv * torch.exp(logp.detach() - sampler) / 4  # d/d log q of the G-OPD IS surrogate
    in_band = torch.tensor([[True, False, True, False]])  # A>0 with q/b > 1.2, A<0 with q/b < 0.8: clipped
    torch.testing.assert_close(logp.grad, torch.where(in_band, on_policy, torch.zeros_like(on_policy)))
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    plain, _ = base_relative_ppo_loss(logp, b, teacher, sampler, mask, 1.2, 0.2, reweight_to_base=False)
    expected, _ = O.ppo_clip_loss(logp, b, adv, mask, 0.2, 0.2, None, O.truncated_is_weights(logp, sampler))
    torch.testing.assert_close(plain, expected)


def test_lambda_above_lambda_star_is_refused_with_the_override(char_tok):
    with pytest.raises(ValueError, match=r"lambda_=1.5 is above the extrapolation cliff λ\* = 1.2200") as err:
        _module(char_tok, lambda_=1.5, lambda_star=1.22)
    assert "allow_above_cliff: true" in str(err.value) and "lambda_: auto (λ* − δ = 1.2000)" in str(err.value)
    assert _module(char_tok, lambda_=1.5, lambda_star=1.22, allow_above_cliff=True).lambda_ == 1.5
    assert _module(char_tok, lambda_=1.2, lambda_star=1.22).lambda_ == 1.2
    module = _module(char_tok, lambda_=50.0)  # checked once λ* is calibrated
    with pytest.raises(ValueError, match=r"above the extrapolation cliff.*binding position \d+, p="):
        module.calibrate(encode_rows(char_tok, ROWS[:4]))


def test_auto_is_lambda_star_minus_delta(char_tok):
    assert _module(char_tok, lambda_star=1.3).lambda_ == pytest.approx(1.28)
    assert _module(char_tok, lambda_star=1.3, delta=0.05).lambda_ == pytest.approx(1.25)
    module = _module(char_tok)
    assert module.lambda_ is None and module.hparams["lambda_"] == "auto"
    report = module.calibrate(encode_rows(char_tok, ROWS[:4]))
    assert math.isfinite(report.lambda_star) and module.lambda_ == pytest.approx(report.lambda_star - 0.02)
    ratios = binding_tail_ratios(module.student, module._calibration_batches, report)
    torch.testing.assert_close(ratios, torch.ones(4, dtype=torch.float64))  # the student is the warm start
    teacher = HFTeacher(make_tiny_model(len(char_tok)), tokenizer=char_tok)
    same = ListOPDModule(make_tiny_model(len(char_tok)), teacher, tokenizer=char_tok)  # λ* = +inf
    with pytest.raises(ValueError, match="no cliff to stay below"):
        same.calibrate(encode_rows(char_tok, ROWS[:2]))
    # two-sided, positions where the random teacher is less certain than the warm start count too
    two_sided = _module(char_tok, two_sided_cliff=True).calibrate(encode_rows(char_tok, ROWS[:4]))
    assert two_sided.lambda_star <= report.lambda_star
    assert any(s.p < s.b and math.isfinite(s.lambda_star) for pr in two_sided.prompts for s in pr.positions)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lambda_": "high"}, "lambda_='high'"), ({"clip": 1.0}, "BaseRelativeClip.clip=1.0"),
     ({"anchor": "gold"}, "anchor='gold'"), ({"objective": Divergence()}, "must be a BaseRelativeClip")],
)
def test_bad_settings_name_the_setting(char_tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        if "objective" in kwargs:
            make_module(char_tok, cls=ListOPDModule, **kwargs)
        else:
            _module(char_tok, **kwargs)


def test_ranking_scores_use_the_rows_metadata(char_tok):
    module = _module(char_tok, lambda_star=2.0)
    completions = [ROWS[0]["answer"], '{"ranking":["a","b","c"]}', ROWS[2]["answer"].replace("{", "{ ")]
    batch = _batch(char_tok, completions)
    valid, ndcg = module.ranking_scores(batch)  # rows without metadata: validity from the answers
    assert valid == [1.0, 0.0, 1.0] and ndcg == []
    batch = _batch(char_tok, completions, with_rows=True)  # the rows travel in the batch
    expected = [RankingTask(k=4).score(completions[i], ROWS[i])["ndcg@1"] for i in (0, 2)]
    assert module.ranking_scores(batch) == ([1.0, 0.0, 1.0], expected)


class ReferenceValidation(RolloutDataModule):
    """Validation "generates" the reference answers, so the contract metrics have parsed outputs."""

    def rollout(self, batch, module, source, step):  # noqa: ANN001, ANN201
        if source == "greedy":
            return dataset_completions(batch, self.tokenizer.pad_token_id)
        return super().rollout(batch, module, source, step)


def test_three_step_fit_logs_contract_metrics(char_tok, tmp_path):
    torch.manual_seed(0)
    module = _module(char_tok, calibration_rows=4, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    dm = ReferenceValidation(ListPrompts(ROWS[:8]), val_source=ListPrompts(ROWS[8:]), batch_size=4,
                             sampling=SamplingParams(max_new_tokens=8))
    trainer = make_trainer(tmp_path, 3, val_check_interval=3, check_val_every_n_epoch=None, limit_val_batches=None,
                           log_every_n_steps=1, logger=CSVLogger(tmp_path, name="l"))
    with pytest.warns(UserWarning, match=r"λ\* = 0\.\d+ < 1"):  # tiny random models: a λ* < 1 pair
        trainer.fit(module, dm)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = lambda key: [float(r[key]) for r in rows if r.get(key)]  # noqa: E731
    assert module.lambda_ == pytest.approx(module.calibration.lambda_star - 0.02)
    assert logged("listopd/lambda_star") == [pytest.approx(module.lambda_star)]
    for key in ("train/parse_valid", "train/clip_frac", "train/tail_ratio", "train/tail_ratio_min",
                "train/lambda"):
        assert len(logged(key)) == 3 and all(math.isfinite(v) for v in logged(key)), key
    assert all(0 <= v <= 1 for v in logged("train/parse_valid") + logged("train/clip_frac"))
    assert logged("val/parse_valid") == [1.0]
    expected = sum(RankingTask(k=4).score(r["answer"], r)["ndcg@1"] for r in ROWS[8:]) / 4
    assert logged("val/ndcg@1") == [pytest.approx(expected)]
