"""Sampled validation on 2 CPU ranks (gloo, ``strategy="ddp"``), run by tests/rollout/test_evaluation.py.

    python tests/rollout/ddp_validate.py OUT_DIR

Lightning re-executes this script for rank 1. Each rank writes ``OUT_DIR/rank{r}.json``: every
score and prompt domain of the validation batches it decoded, and the metrics it logged, so the
test can check that the logged figures are the sums over both ranks' prompts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L

from lit_opd import Evaluation, ListPrompts, PolicyModule, RolloutDataModule, SamplingParams
from lit_opd.tasks import AdditionTask

NUM_SAMPLES = 4


def domain_rows() -> list[dict]:
    """12 sums, "short" or "long" by prompt length: each rank gets 6, in batches of 4 and 2."""
    rows = AdditionTask(max_digits=3, reverse_answer=True).make_rows(12, 0)
    return [dict(row, domain="short" if len(row["prompt"]) <= 6 else "long") for row in rows]


class Record(L.Callback):
    def __init__(self) -> None:
        self.scores: list[list[float]] = []
        self.domains: list[str] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):  # noqa: ANN001
        scores = batch.correct_B.tolist()
        self.scores += [scores[i : i + NUM_SAMPLES] for i in range(0, len(scores), NUM_SAMPLES)]
        self.domains += [row["domain"] for row in batch.rows[::NUM_SAMPLES]]


def main() -> None:
    out = Path(sys.argv[1])
    rows, record = domain_rows(), Record()
    data = RolloutDataModule(
        ListPrompts(rows), val_source=ListPrompts(rows), batch_size=4, val_batch_size=4,
        sampling=SamplingParams(max_new_tokens=6),
        evaluation=Evaluation(decoding="sampled", temperature=3.0, num_samples=NUM_SAMPLES, pass_k=[1, 4]),
    )
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[record])
    [metrics] = trainer.validate(PolicyModule("lit_opd/assets/addition/teacher"), data, verbose=False)
    result = dict(scores=record.scores, domains=record.domains, metrics=metrics)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
