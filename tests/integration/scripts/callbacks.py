"""Callbacks the integration tests add to real CLI runs (``--trainer.callbacks+=...``)."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL this process at the end of training step ``step`` (1-based optimizer steps done).

    Nothing is flushed or saved: the run dies the way it would on a node failure or OOM kill.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
