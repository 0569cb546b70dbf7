"""Builders shared by tests (not fixtures, so subprocess scripts can import them too): keyword
builders for batches, modules and trainers, so a test names what it sets and nothing else."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from lit_opd.tiny import make_tiny_model
from lit_opd.types import RolloutBatch


def save_tiny_model(model, tokenizer, path: str | Path) -> None:  # noqa: ANN001
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def addition_rows(n: int, seed: int = 0) -> list[dict]:
    from lit_opd.tasks import AdditionTask

    return AdditionTask(1, 2).make_rows(n, seed)


def make_rollout_batch(
    tok, prompts: Sequence[str] = ("12+3=", "4+56="), completions: Sequence[str] = ("51", "06"),  # noqa: ANN001
    answers: Sequence[str | None] | None = None, rows: Sequence[dict] | None = None, sampler_logp: float = -1.0,
) -> RolloutBatch:
    """Left-padded prompts and right-padded completions (each + EOS), as the rollout builds them;
    ``sampler_logp`` fills the sampler log-probs."""
    p = tok(list(prompts), padding=True, return_tensors="pt")
    c = [tok(x, add_special_tokens=False).input_ids + [tok.eos_token_id] for x in completions]
    ids_BT = torch.zeros(len(c), max(map(len, c)), dtype=torch.long)
    mask_BT = torch.zeros_like(ids_BT, dtype=torch.bool)
    for i, row in enumerate(c):
        ids_BT[i, : len(row)], mask_BT[i, : len(row)] = torch.tensor(row), True
    return RolloutBatch(
        prompt_ids_BP=p.input_ids, prompt_mask_BP=p.attention_mask, completion_ids_BT=ids_BT,
        completion_mask_BT=mask_BT, sampler_logp_BT=torch.full(ids_BT.shape, sampler_logp),
        answers=list(answers) if answers is not None else [None] * len(c), row_index_B=torch.arange(len(c)),
        rows=[dict(r) for r in rows] if rows is not None else [],
    )


def make_module(tok, cls=None, teacher_seed: int = 1, student_seed: int = 0, hidden: int = 32, **kwargs):  # noqa: ANN001, ANN003, ANN201
    """A method (``OPDModule`` unless ``cls``) on tiny in-memory student and teacher models."""
    from lit_opd import HFTeacher, OPDModule

    student = make_tiny_model(len(tok), hidden, 2, seed=student_seed)
    teacher = HFTeacher(make_tiny_model(len(tok), hidden, 2, seed=teacher_seed), tokenizer=tok)
    return (cls or OPDModule)(student, teacher, tokenizer=tok, **kwargs)


def make_trainer(root: str | Path, max_steps: int, callbacks: Sequence = (), **kwargs) -> L.Trainer:  # noqa: ANN003
    """A quiet CPU trainer: no logger, no checkpoints, no validation unless ``kwargs`` say so."""
    settings = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root, logger=False,
        enable_checkpointing=False,
    )
    settings.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **settings)


__all__ = ["make_tiny_model", "save_tiny_model", "addition_rows", "make_rollout_batch", "make_module", "make_trainer"]
