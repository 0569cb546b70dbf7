"""TeacherGroup: K teachers behind the teacher protocol — identities by name, each member placed,
connected and counted once, the weakest capability, and rows of one batch scored by different
teachers and stitched back in row order."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from lit_opd import HFTeacher, TeacherCapability, TeacherOutput
from lit_opd.teachers import Teacher, TeacherGroup
from lit_opd.teachers.group import select_rows
from tests.helpers import make_rollout_batch, make_tiny_model

PROMPTS, COMPLETIONS = ("12+3=", "4+56=", "7+8=", "99+1="), ("51", "06", "51", "001")
ROWS = [{"prompt": p, "domain": d} for p, d in zip(PROMPTS, ("math", "code", "math", "code"))]


class CountingTeacher(Teacher):
    """A token-log-prob teacher that counts what the group asks of it and can lose rows."""

    capability: ClassVar[TeacherCapability] = TeacherCapability.TOKEN_LOGPROBS

    def __init__(self, name: str, value: float = 0.0, lose: tuple[int, ...] = ()) -> None:
        self.name, self.value, self.lose = name, value, lose
        self.moved, self.connected, self.restored = 0, 0, None
        self.grad_enabled: list[bool] = []

    def score(self, batch):  # noqa: ANN001, ANN201
        self.grad_enabled.append(torch.is_grad_enabled())
        B = batch.completion_ids_BT.shape[0]
        answered_B = torch.tensor([i not in self.lose for i in range(B)]) if self.lose else None
        return TeacherOutput(token_logp_BT=torch.full(batch.completion_ids_BT.shape, self.value)
                             + batch.row_index_B[:, None].float(), answered_B=answered_B)

    def identity(self):  # noqa: ANN201
        return {"class": "CountingTeacher", "name": self.name}

    def to(self, device):  # noqa: ANN001, ANN201
        self.moved += 1
        return self

    def connect(self) -> None:
        self.connected += 1

    def stats(self):  # noqa: ANN201
        return {"requests": 3.0 + self.value}

    def restore_stats(self, stats):  # noqa: ANN001
        self.restored = stats


@pytest.fixture(scope="module")
def hf_pair(char_tok):
    return (HFTeacher(make_tiny_model(len(char_tok), 32, 2, seed=1), tokenizer=char_tok, name="a"),
            HFTeacher(make_tiny_model(len(char_tok), 48, 2, seed=2), tokenizer=char_tok, name="b"))


def test_identity_lifecycle_and_stats_are_per_member_and_once_per_object():
    a, b = CountingTeacher("a", 1.0), CountingTeacher("b", 2.0)
    group = TeacherGroup({"a": a, "b": b, "a_again": a})  # one teacher under two names
    assert group.identity() == {"a": a.identity(), "b": b.identity(), "a_again": a.identity()}
    group.to("cpu")
    group.connect()
    assert (a.moved, a.connected, b.moved, b.connected) == (1, 1, 1, 1)
    assert group.stats() == {"a/requests": 4.0, "b/requests": 5.0, "a_again/requests": 4.0}
    group.restore_stats({"a/requests": 9.0, "b/requests": 8.0, "b/failed": 1.0})
    assert b.restored == {"requests": 8.0, "failed": 1.0}
    assert group.capability == TeacherCapability.TOKEN_LOGPROBS


def test_capability_is_the_weakest_members_and_the_tokenizer_is_shared_only_when_all_agree(hf_pair):
    assert TeacherGroup({"a": hf_pair[0], "b": hf_pair[1]}).capability == TeacherCapability.FULL_LOGITS
    mixed = TeacherGroup({"a": hf_pair[0], "c": CountingTeacher("c")})
    assert mixed.capability == TeacherCapability.TOKEN_LOGPROBS
    assert mixed.tokenizer is None  # a member without a tokenizer: nothing to check for the group
    assert TeacherGroup({"a": hf_pair[0], "b": hf_pair[1]}).tokenizer is hf_pair[0].tokenizer


def test_plain_score_without_a_route_field_says_how_a_group_is_used(char_tok):
    group = TeacherGroup({"a": CountingTeacher("a"), "b": CountingTeacher("b")})
    with pytest.raises(ValueError, match="MADOPDModule .*route_field"):
        group.score(make_rollout_batch(char_tok))


def test_score_rows_stitches_each_teachers_rows_back_in_order(char_tok, hf_pair):
    batch = make_rollout_batch(char_tok, PROMPTS, COMPLETIONS, rows=ROWS)
    group = TeacherGroup({"a": hf_pair[0], "b": hf_pair[1]})
    route = ["a", "b", "a", "b"]
    stitched = group.score_rows(batch, route)
    whole = group.score_each(batch)
    for i, name in enumerate(route):
        torch.testing.assert_close(stitched.logits_BTV[i], whole[name].logits_BTV[i], atol=1e-5, rtol=1e-5)
    assert not stitched.logits_BTV.requires_grad and stitched.answered_B is None


def test_score_routes_by_the_row_field_and_names_an_unmapped_value(char_tok, hf_pair):
    batch = make_rollout_batch(char_tok, PROMPTS, COMPLETIONS, rows=ROWS)
    group = TeacherGroup({"a": hf_pair[0], "b": hf_pair[1]}, route_field="domain",
                         routes={"math": "a", "code": "b"})
    by_route = group.score_rows(batch, ["a", "b", "a", "b"])
    torch.testing.assert_close(group.score(batch).logits_BTV, by_route.logits_BTV)
    law = {"prompt": "1+1=", "domain": "law"}
    bad = make_rollout_batch(char_tok, PROMPTS[:2], COMPLETIONS[:2], rows=[ROWS[0], law])
    with pytest.raises(ValueError, match=r"row 1: domain='law'.*known domain values: \['code', 'math'\]"):
        group.score(bad)
    missing = make_rollout_batch(char_tok, PROMPTS[:1], COMPLETIONS[:1], rows=[{"prompt": "1+1="}])
    with pytest.raises(ValueError, match="row 0 has no field 'domain'"):
        group.score(missing)
    by_name = TeacherGroup({"math": hf_pair[0], "code": hf_pair[1]}, route_field="domain")  # values are names
    torch.testing.assert_close(by_name.score(batch).logits_BTV, group.score(batch).logits_BTV)


def test_unanswered_rows_survive_stitching_and_members_score_without_grad(char_tok):
    a, b = CountingTeacher("a", 0.0, lose=(1,)), CountingTeacher("b", 10.0)
    batch = make_rollout_batch(char_tok, PROMPTS, COMPLETIONS, rows=ROWS)
    with torch.enable_grad():
        out = TeacherGroup({"a": a, "b": b}).score_rows(batch, ["a", "a", "b", "b"])
    # a scored rows 0, 1 (lost its second), b rows 2, 3; values carry each row's own index
    assert out.answered_B.tolist() == [True, False, True, True]
    assert out.token_logp_BT[:, 0].tolist() == [0.0, 1.0, 12.0, 13.0]
    assert a.grad_enabled == [False] and b.grad_enabled == [False]


def test_members_of_different_kinds_cannot_be_stitched(char_tok, hf_pair):
    batch = make_rollout_batch(char_tok, PROMPTS, COMPLETIONS, rows=ROWS)
    group = TeacherGroup({"a": hf_pair[0], "c": CountingTeacher("c")})
    with pytest.raises(ValueError, match="return different fields"):
        group.score_rows(batch, ["a", "c", "a", "c"])


def test_select_rows_keeps_every_per_row_field(char_tok):
    batch = make_rollout_batch(char_tok, PROMPTS, COMPLETIONS, answers=["a0", "a1", "a2", "a3"], rows=ROWS)
    part = select_rows(batch, torch.tensor([3, 1]))
    assert part.answers == ["a3", "a1"] and part.rows == [ROWS[3], ROWS[1]]
    assert part.row_index_B.tolist() == [3, 1] and part.prompt_ids_BP.shape[1] == batch.prompt_ids_BP.shape[1]
    torch.testing.assert_close(part.completion_ids_BT, batch.completion_ids_BT[[3, 1]])


def test_bad_groups_name_the_setting():
    with pytest.raises(ValueError, match="non-empty mapping"):
        TeacherGroup({})
    with pytest.raises(ValueError, match=r"teachers\['a'\] must be a single teacher"):
        TeacherGroup({"a": "not a teacher"})
    member = CountingTeacher("a")
    with pytest.raises(ValueError, match="must be a single teacher"):
        TeacherGroup({"g": TeacherGroup({"a": member})})
    with pytest.raises(ValueError, match=r"routes sends \{'x': 'b'\} to teachers that do not exist"):
        TeacherGroup({"a": member}, route_field="domain", routes={"x": "b"})
