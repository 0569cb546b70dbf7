"""HFTeacher(temperature=τ): score, score_hidden and the scoring model that ListOPD calibrates with all give
softmax(logits / τ); bad values are refused naming the setting."""

from __future__ import annotations

import pytest
import torch

from lit_opd import HFTeacher
from lit_opd.methods.list_opd.calibration import build_batches, calibrate_batches, encode_rows
from lit_opd.cli import cli_main
from lit_opd.models import completion_hidden
from lit_opd.methods.list_opd import ListOPDModule
from lit_opd.models import completion_logits
from lit_opd.tasks import RankingTask
from lit_opd.teachers.hf import TemperatureScaled
from tests.helpers import make_tiny_model

ROWS = RankingTask(k=4).make_rows(4, seed=0)


def _batch(tok):
    return build_batches(tok, encode_rows(tok, ROWS))[0].rollout


def test_score_divides_the_logits_by_the_temperature(char_tok):
    model = make_tiny_model(len(char_tok), seed=1)
    batch = _batch(char_tok)
    raw = HFTeacher(model, tokenizer=char_tok).score(batch).logits_BTV
    hot = HFTeacher(model, tokenizer=char_tok, temperature=2.5)
    torch.testing.assert_close(hot.score(batch).logits_BTV, raw / 2.5)
    torch.testing.assert_close(completion_logits(hot.scoring_model(), batch), raw / 2.5)
    lean = hot.score_hidden(batch)  # the memory-lean path: h·(W/τ)ᵀ
    torch.testing.assert_close(lean.hidden_BTH @ lean.head_weight_VH.T, raw / 2.5, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lean.hidden_BTH, completion_hidden(model, batch))
    assert HFTeacher(model, tokenizer=char_tok).scoring_model() is model  # τ = 1: the model itself
    assert hot.identity()["temperature"] == 2.5 and "temperature" not in HFTeacher(model, tokenizer=char_tok).identity()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), "hot", True])
def test_bad_temperature_is_refused(char_tok, bad):
    with pytest.raises(ValueError, match=r"HFTeacher.temperature=.* must be a finite number > 0"):
        HFTeacher(make_tiny_model(len(char_tok)), tokenizer=char_tok, temperature=bad)


def test_listopd_calibrates_the_tempered_teacher(char_tok):
    teacher_model = make_tiny_model(len(char_tok), seed=1)
    teacher = HFTeacher(teacher_model, tokenizer=char_tok, temperature=1.7)
    module = ListOPDModule(make_tiny_model(len(char_tok), seed=0), teacher, tokenizer=char_tok, lambda_=1.0,
                           allow_above_cliff=True)
    report = module.calibrate(encode_rows(char_tok, ROWS))
    batches = build_batches(char_tok, encode_rows(char_tok, ROWS))
    hot = calibrate_batches(TemperatureScaled(teacher_model, 1.7), module.reference, char_tok, batches)
    cold = calibrate_batches(teacher_model, module.reference, char_tok, batches)
    assert [s.p for p in report.prompts for s in p.positions] == [s.p for p in hot.prompts for s in p.positions]
    assert [s.p for p in report.prompts for s in p.positions] != [s.p for p in cold.prompts for s in p.positions]


def test_calibrate_subcommand_takes_the_teacher_temperature(student_dir, teacher_dir, capsys):
    args = ["calibrate", "--teacher", teacher_dir, "--student", student_dir, "--num_rows", "3", "--k", "4"]
    cli_main(args)
    cold = capsys.readouterr().out.strip().splitlines()
    cli_main(args + ["--teacher_temperature", "3.0"])
    hot = capsys.readouterr().out.strip().splitlines()
    assert cold[0] == hot[0] and cold[1] != hot[1]  # same table header, different p


def test_untempered_lean_scoring_hands_over_the_head_weight_itself(char_tok):
    """τ = 1 must not copy the [V, H] output weight on every step; τ ≠ 1 folds 1/τ into a copy."""
    from lit_opd.types import RolloutBatch

    model = make_tiny_model(len(char_tok))
    batch = RolloutBatch(prompt_ids_BP=torch.ones(1, 2, dtype=torch.long), prompt_mask_BP=torch.ones(1, 2, dtype=torch.long),
                         completion_ids_BT=torch.tensor([[5, 3]]), completion_mask_BT=torch.ones(1, 2, dtype=torch.bool),
                         sampler_logp_BT=None, answers=[None], row_index_B=torch.arange(1))
    plain = HFTeacher(model, tokenizer=char_tok).score_hidden(batch)
    assert plain.head_weight_VH is model.get_output_embeddings().weight
    hot = HFTeacher(model, tokenizer=char_tok, temperature=2.0).score_hidden(batch)
    torch.testing.assert_close(hot.head_weight_VH, model.get_output_embeddings().weight / 2.0)
