"""The shipped carry-addition models load through transformers and solve the task as their configs
say: both teachers (character and BPE tokenizer) get most sums right, the warm-started student
clearly fewer, and the BPE teacher's tokenizer is one token-level distillation must refuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_opd.models import check_tokenizers_compatible, load_causal_lm, load_tokenizer
from lit_opd.tasks import CarryAdditionTask
from lit_opd.teachers.text import HFTextTeacher

ASSETS = Path(__file__).resolve().parents[2] / "lit_opd" / "assets" / "carry_addition"
ROWS = CarryAdditionTask().make_rows(16, seed=11)  # a seed no config trains or validates on


def solved(path: Path) -> int:
    """How many of ROWS the model at ``path`` answers right, greedily."""
    teacher = HFTextTeacher(str(path), batch_size=len(ROWS))
    outs = teacher.generate_text([row["prompt"] for row in ROWS], max_new_tokens=48, temperature=0)
    return sum(CarryAdditionTask().verify(out[0], row["answer"]) for out, row in zip(outs, ROWS))


@pytest.fixture(scope="module")
def scores() -> dict[str, int]:
    with torch.random.fork_rng(devices=[]):
        return {name: solved(ASSETS / name) for name in ("teacher", "teacher_other_tok", "student")}


def test_teachers_solve_most_and_the_student_fewer(scores):
    assert scores["teacher"] >= 14, scores
    assert scores["teacher_other_tok"] >= 13, scores
    assert 1 <= scores["student"] <= 10 and scores["student"] <= scores["teacher"] - 5, scores


@pytest.mark.parametrize("name", ["teacher", "teacher_other_tok"])
def test_teachers_continue_answers_cut_anywhere(name):
    """A text-only method hands a teacher the student's answer cut after any character, often inside
    one of the teacher's own tokens; both teachers carry on from there (the BPE one was trained with
    BPE dropout for this)."""
    cut = [(row, len(row["answer"]) * i // 4) for row in ROWS for i in (1, 2, 3)]
    teacher = HFTextTeacher(str(ASSETS / name), batch_size=len(cut))
    prefixes = [row["prompt"] + row["answer"][:k] for row, k in cut]
    outs = teacher.generate_text(prefixes, max_new_tokens=48, temperature=0)
    right = sum(r["answer"][:k] + out[0] == r["answer"] for (r, k), out in zip(cut, outs))
    assert right >= 0.85 * len(cut), (name, right, len(cut))


def test_assets_load_as_plain_transformers_models():
    for name in ("teacher", "teacher_other_tok", "student"):
        model, tok = load_causal_lm(str(ASSETS / name)), load_tokenizer(None, str(ASSETS / name))
        assert model.get_input_embeddings().weight.shape[0] == len(tok)
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 2, 3)


def test_only_the_other_teacher_has_another_tokenizer():
    student = load_tokenizer(None, str(ASSETS / "student"))
    check_tokenizers_compatible(student, load_tokenizer(None, str(ASSETS / "teacher")))
    other = load_tokenizer(None, str(ASSETS / "teacher_other_tok"))
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_tokenizers_compatible(student, other)
    answer = ROWS[0]["answer"]
    assert len(other(answer, add_special_tokens=False)["input_ids"]) < len(answer)
    assert len(student(answer, add_special_tokens=False)["input_ids"]) == len(answer)
