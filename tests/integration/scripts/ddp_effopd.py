"""EffOPD under ``strategy="ddp"``, 2 CPU processes (gloo); run by tests/integration/test_eff_opd_fit.py.

    python tests/integration/scripts/ddp_effopd.py STUDENT_DIR TEACHER_DIR OUT_DIR

The held-out score is deliberately rank-dependent: rank 0 rates its n-th call 2n (always better),
rank 1 rates it −n (always worse). On its own rank 1 would reject every trial while rank 0 accepted
all five; the callback averages the scores over ranks (n/2, rising), so both must accept all of
them and end with the same weights. Each rank writes ``OUT_DIR/rank{r}.json``: its raw scores, the
callback's history and its student checksum before and after training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L

from lit_opd.methods.eff_opd.callback import EffOPDCallback
from tests.integration.scripts.ddp_fit import checksum, fit_two_ranks


class RankSkewedScore:
    def __init__(self) -> None:
        self.raw: list[float] = []

    def __call__(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        n = len(self.raw) + 1
        self.raw.append(2.0 * n if trainer.global_rank == 0 else -float(n))
        return self.raw[-1]


class Record(L.Callback):
    def __init__(self, out_dir: Path, effopd: EffOPDCallback, score: RankSkewedScore) -> None:
        self.out_dir, self.effopd, self.score, self.initial = out_dir, effopd, score, None

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.initial = checksum(pl_module.student)["sha256"]

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "raw_scores": self.score.raw,
            "history": [{k: v for k, v in r.items() if k != "seconds"} for r in self.effopd.history],
            "initial": self.initial,
            "final": checksum(pl_module.student)["sha256"],
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    student, teacher, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    score = RankSkewedScore()
    effopd = EffOPDCallback(score_fn=score)
    fit_two_ranks(student, teacher, "ddp", max_steps=2, callbacks=[effopd, Record(out, effopd, score)])


if __name__ == "__main__":
    main()
