"""HealthGuard on steps without supervision (issue 24): an update whose teacher answered no row leaves
the student and AdamW's state bit-identical (a partially answered one still trains), and a teacher
that stays down for ``max_unsupervised_steps`` steps in a row stops the run with one line naming its
URL, while a shorter outage followed by a supervised step lets the run finish."""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import pytest
import torch

from lit_opd import HFTeacher, OPDModule, RolloutDataModule, SamplingParams, TaskPrompts
from lit_opd.callbacks import HealthGuard
from lit_opd.errors import TeacherUnreachable, user_message
from lit_opd.tasks import AdditionTask
from lit_opd.teachers.base import Teacher
from lit_opd.types import RolloutBatch, TeacherCapability, TeacherOutput
from tests.helpers import make_tiny_model, make_trainer

URL = "http://teacher.test:8000/v1"


class Outages(Teacher):
    """A local teacher posing as a remote one at :data:`URL`: on the calls listed in ``down`` it
    answers no row, on those in ``partial`` only the first half of the rows."""

    capability = TeacherCapability.FULL_LOGITS

    def __init__(self, inner: HFTeacher, down: set[int], partial: set[int] = frozenset()) -> None:
        self.inner, self.down, self.partial, self.calls = inner, down, partial, 0
        self.tokenizer = inner.tokenizer

    def identity(self) -> dict:
        return {"class": "Outages", "base_url": URL}

    def to(self, device: torch.device | str) -> Outages:
        self.inner.to(device)
        return self

    def score(self, batch: RolloutBatch) -> TeacherOutput:
        call, self.calls = self.calls, self.calls + 1
        out = self.inner.score(batch)
        answered_B = torch.ones(batch.completion_ids_BT.shape[0], dtype=torch.bool)
        answered_B[answered_B.shape[0] // 2 :] = call not in self.partial
        answered_B &= call not in self.down
        return replace(out, answered_B=answered_B.to(batch.completion_ids_BT.device))


def _module(tok, down: set[int], partial: set[int] = frozenset()) -> OPDModule:
    teacher = Outages(HFTeacher(make_tiny_model(len(tok), 32, 2, seed=1), tokenizer=tok), down, partial)
    adamw = lambda params: torch.optim.AdamW(params, lr=1e-2)
    return OPDModule(make_tiny_model(len(tok), 32, 2, seed=0), teacher, tokenizer=tok, optimizer=adamw)


def _data() -> RolloutDataModule:
    return RolloutDataModule(TaskPrompts(AdditionTask(1, 2), num_rows=24), val_size=0, batch_size=4,
                             sampling=SamplingParams(max_new_tokens=4))


def snapshot(module: L.LightningModule, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every student parameter and every optimizer state tensor (AdamW: exp_avg, exp_avg_sq, step)."""
    named = dict(module.student.named_parameters())
    names = {id(p): n for n, p in named.items()}
    taken = {f"param {n}": p.detach().clone() for n, p in named.items()}
    for p, state in optimizer.state.items():
        taken.update({f"{key} {names[id(p)]}": torch.as_tensor(v).clone() for key, v in state.items()})
    return taken


class Snapshots(L.Callback):
    """:func:`snapshot` after every training step."""

    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(snapshot(pl_module, trainer.optimizers[0]))


def _identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _all_changed(a: dict, b: dict) -> list[str]:
    """The keys whose tensors did not change from ``a`` to ``b`` (empty: every one changed)."""
    assert a.keys() == b.keys()
    return [k for k in a if torch.equal(a[k], b[k])]


def test_an_unanswered_step_leaves_student_and_adamw_bit_identical(char_tok, tmp_path):
    """Steps 0, 1 answered, 2 answered by no row, 3 by half the rows: only step 2 changes nothing."""
    module = _module(char_tok, down={2}, partial={3})
    snaps = Snapshots()
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[snaps])
    with pytest.warns(UserWarning, match=rf"HealthGuard: global step 2: Outages at {URL} answered none of this "
                                         r"step's rows; this update was skipped.*\(1/5 in a row"):
        trainer.fit(module, _data())
    first, second, unanswered, partial = snaps.after
    assert any(k.startswith("exp_avg_sq ") for k in first) and len(first) == 4 * len(list(module.parameters()))
    assert _all_changed(first, second) == []  # a normal step moves every parameter and every state tensor
    assert _identical(second, unanswered)  # ... the unanswered one none, bit for bit
    assert _all_changed(unanswered, partial) == []  # half the rows answered: it trains
    assert trainer.global_step == 4 and trainer.callback_metrics["train/skipped_unsupervised"] == 1
    assert all(int(s["step"]) == 3 for s in trainer.optimizers[0].state.values())


def test_a_teacher_down_for_max_unsupervised_steps_stops_the_run_in_one_line(char_tok, tmp_path):
    module = _module(char_tok, down=set(range(1, 100)))
    snaps = Snapshots()
    guard = HealthGuard(max_unsupervised_steps=3)
    trainer = make_trainer(tmp_path, max_steps=20, callbacks=[guard, snaps])
    with pytest.warns(UserWarning, match=r"global step 2: .*\(2/3 in a row"), pytest.raises(TeacherUnreachable) as err:
        trainer.fit(module, _data())
    message = str(err.value)
    assert message.startswith(f"At global step 3: Outages at {URL} answered none of the rows of the last 3 "
                              "training steps")
    assert "\n" not in message and message.count(URL) == 1 and "HealthGuard.max_unsupervised_steps=3" in message
    assert user_message(err.value) == message  # the CLI prints it as it is, without a traceback
    assert trainer.global_step == 3 and guard.skipped_unsupervised == 3
    assert _identical(snaps.after[0], snapshot(module, trainer.optimizers[0]))  # as after the last answered step


def test_an_outage_shorter_than_the_budget_lets_the_run_finish(char_tok, tmp_path):
    """Two outages of 2 steps with a budget of 3: the answered step between them resets the count."""
    module = _module(char_tok, down={1, 2, 4, 5})
    guard = HealthGuard(max_unsupervised_steps=3)
    trainer = make_trainer(tmp_path, max_steps=7, callbacks=[guard])
    with pytest.warns(UserWarning, match=r"global step 5: .*\(2/3 in a row"):
        trainer.fit(module, _data())
    assert trainer.global_step == 7 and guard.skipped_unsupervised == 4 and guard.unsupervised_in_a_row == 0
    assert all(int(s["step"]) == 3 for s in trainer.optimizers[0].state.values())
    assert HealthGuard().max_unsupervised_steps == 5
