"""OPAD through MADOPDModule: per-turn rows reach the module as ordinary rows, tool spans inside a
completion (mode full) get no loss weight and no gradient, and a short fixed-weight fit on the
tool task's turns moves the student."""

from __future__ import annotations

from typing import ClassVar

import torch

from lit_opd import HFTeacher, RolloutDataModule, SamplingParams, TurnPrompts
from lit_opd.methods.mad_opd import MADOPDModule
from lit_opd.models import completion_logits
from lit_opd.tasks import ToolCalcTask, tool_calc_tokenizer
from lit_opd.teachers.base import Teacher
from lit_opd.tiny import make_tiny_model
from lit_opd.types import RolloutBatch, TeacherCapability, TeacherOutput
from tests.helpers import make_trainer


class FixedLogitsTeacher(Teacher):
    """Full logits given in advance, so a test can change them at chosen positions only."""

    capability: ClassVar[TeacherCapability] = TeacherCapability.FULL_LOGITS

    def __init__(self, logits_BTV: torch.Tensor) -> None:
        self.logits_BTV = logits_BTV

    def score(self, batch: RolloutBatch) -> TeacherOutput:
        return TeacherOutput(logits_BTV=self.logits_BTV)

    def identity(self) -> dict:
        return {"class": "FixedLogitsTeacher"}


def _episode_batch(tok) -> RolloutBatch:  # noqa: ANN001
    """One full-mode episode: two generated turns around a tool span that is not trained on."""
    pieces = [("CALL add 2 3<eos>", True), ("<bos>tool: 5<eos><bos>assistant: ", False), ("5<eos>", True)]
    ids = [tok(text, add_special_tokens=False)["input_ids"] for text, _ in pieces]
    completion = torch.tensor([sum(ids, [])])
    loss_mask = torch.tensor([[trained for piece, (_, trained) in zip(ids, pieces) for _ in piece]])
    user = [{"role": "user", "content": "2+3"}]
    encoded = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True)
    prompt = torch.tensor([encoded["input_ids"]])
    return RolloutBatch(prompt_ids_BP=prompt, prompt_mask_BP=torch.ones_like(prompt),
                        completion_ids_BT=completion,
                        completion_mask_BT=torch.ones_like(completion, dtype=torch.bool),
                        sampler_logp_BT=None, answers=["5"], row_index_B=torch.zeros(1, dtype=torch.long),
                        loss_mask_BT=loss_mask, rows=[{"messages": [{"role": "user", "content": "2+3"}]}])


def test_tool_span_tokens_get_no_loss_weight_and_no_gradient():
    tok = tool_calc_tokenizer()
    batch = _episode_batch(tok)
    tool_T = ~batch.loss_mask_BT[0]
    assert tok.decode(batch.completion_ids_BT[0][tool_T].tolist()) == "<bos>tool: 5<eos><bos>assistant: "
    T, V = batch.completion_ids_BT.shape[1], len(tok)
    base = torch.randn(2, 1, T, V, generator=torch.Generator().manual_seed(0))
    moved = base.clone()
    moved[:, :, tool_T] = torch.randn(2, 1, int(tool_T.sum()), V) * 10  # wild teachers on the tool span
    losses, grads = [], []
    for logits in (base, moved):
        module = MADOPDModule(make_tiny_model(V, 32, 2, seed=0, max_positions=64),
                              {"a": FixedLogitsTeacher(logits[0]), "b": FixedLogitsTeacher(logits[1])},
                              tokenizer=tok, mode="fixed")
        loss, _ = module.mad_loss(batch)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, module.student.get_input_embeddings().weight)[0])
    assert losses[0] > 0 and torch.allclose(losses[0], losses[1])  # the tool span does not enter the loss
    assert torch.allclose(grads[0], grads[1])


def test_student_logits_on_the_tool_span_get_zero_gradient(monkeypatch):
    tok = tool_calc_tokenizer()
    batch = _episode_batch(tok)
    T, V = batch.completion_ids_BT.shape[1], len(tok)
    teachers = {n: FixedLogitsTeacher(torch.randn(1, T, V, generator=torch.Generator().manual_seed(s)))
                for n, s in (("a", 1), ("b", 2))}
    student = make_tiny_model(V, 32, 2, seed=0, max_positions=64)
    module = MADOPDModule(student, teachers, tokenizer=tok, mode="fixed")
    captured = {}
    original = completion_logits

    def spy(student, b):  # noqa: ANN001, ANN202
        captured["logits"] = original(student, b)
        captured["logits"].retain_grad()
        return captured["logits"]

    monkeypatch.setattr("lit_opd.methods.mad_opd.module.completion_logits", spy)
    loss, _ = module.mad_loss(batch)
    loss.backward()
    grad_TV = captured["logits"].grad[0]
    assert (grad_TV[~batch.loss_mask_BT[0]] == 0).all()
    assert (grad_TV[batch.loss_mask_BT[0]].abs().sum(-1) > 0).all()


def test_a_short_fixed_weight_fit_on_turn_rows_moves_the_student(tmp_path):
    tok = tool_calc_tokenizer()
    V = len(tok)
    teachers = {name: HFTeacher(make_tiny_model(V, 32, 2, seed=seed, max_positions=160), tokenizer=tok,
                                name=name) for name, seed in (("late", 1), ("early", 2))}
    module = MADOPDModule(make_tiny_model(V, 32, 2, seed=0, max_positions=160), teachers, tokenizer=tok,
                          mode="fixed", weights={"late": 0.75, "early": 0.25},
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    dm = RolloutDataModule(TurnPrompts(task=ToolCalcTask(min_terms=3, max_terms=3), num_rows=8), val_size=0,
                           batch_size=3, group_field="group_id", sampling=SamplingParams(max_new_tokens=6))
    seen = []
    trainer = make_trainer(tmp_path, max_steps=2)
    original = module.training_step

    def training_step(batch, batch_idx):  # noqa: ANN001, ANN202
        seen.append([(r["group_id"], r["turn_index"]) for r in batch.rows])
        return original(batch, batch_idx)

    module.training_step = training_step
    trainer.fit(module, dm)
    assert all(len({g for g, _ in rows}) == 1 and [t for _, t in rows] == [0, 1, 2] for rows in seen)
    assert any(not torch.equal(before[k], v) for k, v in module.student.state_dict().items())
