"""The teacher protocol is the only contract: every optional ability has a default on the base
class, and HFTeacher provides each one for real."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from lit_opd import HFTeacher, TeacherCapability, TeacherOutput
from lit_opd.teachers import Teacher
from tests.helpers import make_rollout_batch, make_tiny_model


class TokenLogprobTeacher(Teacher):
    """The least a teacher must write: a capability, ``score`` and ``identity``."""

    capability: ClassVar[TeacherCapability] = TeacherCapability.TOKEN_LOGPROBS

    def score(self, batch):  # noqa: ANN001, ANN201
        return TeacherOutput(token_logp_BT=torch.zeros(batch.completion_ids_BT.shape))

    def identity(self):  # noqa: ANN201
        return {"class": "TokenLogprobTeacher"}


def test_optional_abilities_default_to_absent(char_tok):
    teacher = TokenLogprobTeacher()
    batch = make_rollout_batch(char_tok)
    assert teacher.to("cpu") is teacher
    assert teacher.score_hidden(batch) is None
    assert teacher.generator() is None and teacher.scoring_model() is None
    with pytest.raises(NotImplementedError, match="TokenLogprobTeacher cannot generate text"):
        teacher.generate_text(["1+1="], max_new_tokens=4)


def test_hf_teacher_provides_every_ability(char_tok):
    model = make_tiny_model(len(char_tok), seed=3)
    teacher = HFTeacher(model, tokenizer=char_tok)
    batch = make_rollout_batch(char_tok)
    assert teacher.generator() is model and teacher.scoring_model() is model
    lean = teacher.score_hidden(batch)
    assert lean.hidden_BTH.shape[:2] == batch.completion_ids_BT.shape and lean.logits_BTV is None
    texts = teacher.generate_text(["12+3=", "4+56="], max_new_tokens=5, num_samples=3, seed=7)
    assert [len(t) for t in texts] == [3, 3] and all(isinstance(x, str) and len(x) <= 5 for t in texts for x in t)
    assert texts == teacher.generate_text(["12+3=", "4+56="], max_new_tokens=5, num_samples=3, seed=7)
    assert texts != teacher.generate_text(["12+3=", "4+56="], max_new_tokens=5, num_samples=3, seed=8)
