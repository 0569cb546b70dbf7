"""OPD on 2 CPU processes (DDP, gloo), each rank with its own colocated vLLM engine. Run by
tests/rollout/engines/test_vllm_ddp.py:

    python tests/rollout/engines/ddp_vllm_fit.py OUT_DIR [ddp|fsdp2]

``fsdp2``: Lightning's ModelParallelStrategy shards the student per decoder layer; each sync gathers
the shards (every rank joins) before the rank's engine loads them.

Each rank writes ``OUT_DIR/rank{r}.json``: the completions it trained on per step, its engine's sync
count, the largest per-step ``mismatch_kl`` (engine vs the rank's own student) and a checksum of the
student's weights at the end.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import lightning as L
import torch

from lit_opd import (
    Divergence,
    HFTeacher,
    OPDModule,
    RolloutBatch,
    RolloutDataModule,
    SamplingParams,
    TaskPrompts,
)
from lit_opd.rollout.engines import VLLMEngine
from lit_opd.tasks import AdditionTask

ASSETS = Path(__file__).resolve().parents[3] / "lit_opd" / "assets" / "addition"


class Record(L.Callback):
    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.completions, self.mismatch = out_dir, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        assert isinstance(batch, RolloutBatch)
        self.completions.append(batch.completion_ids_BT.masked_fill(~batch.completion_mask_BT, -1).tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.mismatch.append(float(pl_module.step_terms["mismatch_kl"]))

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in pl_module.student.parameters()]
        blob = b"".join(p.detach().float().numpy().tobytes() for p in params)
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "steps": trainer.global_step,
                  "completions": self.completions, "syncs": trainer.datamodule.engine.syncs,
                  "max_mismatch_kl": max(self.mismatch), "weights": hashlib.sha256(blob).hexdigest(),
                  "sharded": any(hasattr(p, "full_tensor") for p in pl_module.student.parameters())}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    out = Path(sys.argv[1])
    strategy = sys.argv[2] if len(sys.argv) > 2 else "ddp"
    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    L.seed_everything(0)
    module = OPDModule(str(ASSETS / "student_h32"), HFTeacher(str(ASSETS / "teacher")),
                       objective=Divergence(kind="jsd", beta=0.0),
                       optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    data = RolloutDataModule(TaskPrompts(AdditionTask(3, 3, reverse_answer=True), num_rows=256), val_size=0,
                             batch_size=8, sampling=SamplingParams(max_new_tokens=6),
                             engine=VLLMEngine(dtype="float32", max_model_len=64))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Record(out)])
    trainer.fit(module, data)


if __name__ == "__main__":
    main()
