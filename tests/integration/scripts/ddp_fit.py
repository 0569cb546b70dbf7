"""OPD with 2 CPU processes (gloo): ``strategy="ddp"``, or with ``fsdp2`` Lightning's
ModelParallelStrategy where ``configure_model`` shards the student with ``fully_shard``.
Run by tests/integration/test_ddp.py.

    python tests/integration/scripts/ddp_fit.py STUDENT_DIR TEACHER_DIR OUT_DIR [ddp|fsdp2]

Lightning re-executes this script for rank 1. Each rank writes ``OUT_DIR/rank{r}.json``: the
prompt rows and completion tokens it trained on at every step, its student checksum before and
after training, the world size it saw, and ``evaluate()``'s result.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import lightning as L
import torch

from lit_opd import Divergence, HFTeacher, OPDModule, RolloutBatch, RolloutDataModule, SamplingParams, TaskPrompts
from lit_opd.tasks import AdditionTask


def checksum(module: torch.nn.Module) -> dict:
    # Sharded parameters are gathered first (a collective: every rank calls this).
    params = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().float()
              for p in module.parameters()]
    blob = b"".join(p.numpy().tobytes() for p in params)
    return {"sha256": hashlib.sha256(blob).hexdigest(), "sum": float(sum(p.double().sum() for p in params))}


class Record(L.Callback):
    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.steps, self.initial = out_dir, [], None

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.initial = checksum(pl_module.student)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        assert isinstance(batch, RolloutBatch), type(batch)
        ids = batch.completion_ids_BT.masked_fill(~batch.completion_mask_BT, -1)
        self.steps.append(
            {"rows": batch.row_index_B.tolist(), "completions": ids.tolist(), "source": batch.source}
        )

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "steps": self.steps,
            "initial": self.initial,
            "final": checksum(pl_module.student),
            "sharded": any(hasattr(p, "full_tensor") for p in pl_module.student.parameters()),
            # greedy accuracy on the 11 validation prompts: split over ranks (ddp) or not (fsdp2),
            # and the same prompts decoded unsplit on this rank, for comparison
            "evaluate": trainer.datamodule.evaluate(pl_module),
            "unsplit": trainer.datamodule.greedy_correct(trainer.datamodule.val_rows, pl_module),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    student, teacher, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    strategy = sys.argv[4] if len(sys.argv) > 4 else "ddp"
    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    fit_two_ranks(student, teacher, strategy, max_steps=3, callbacks=[Record(out)])


def fit_two_ranks(student: str, teacher: str, strategy, max_steps: int, callbacks: list) -> None:  # noqa: ANN001
    """A tiny JSD OPD fit on 2 CPU ranks (shared with the other distributed test scripts)."""
    L.seed_everything(0)
    module = OPDModule(
        student, HFTeacher(teacher), objective=Divergence(kind="jsd"),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    data = RolloutDataModule(
        TaskPrompts(AdditionTask(1, 2), num_rows=64), val_size=11, batch_size=4,
        sampling=SamplingParams(max_new_tokens=6),
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
    )
    trainer.fit(module, data)


if __name__ == "__main__":
    main()
