"""AccuracyReport: greedy validation accuracy before and after training, as one RESULT line."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class AccuracyReport(L.Callback):
    """Evaluates the student on the DataModule's validation prompts when training starts and ends
    and prints ``RESULT <name> <before> <after>``; both numbers are also logged.

    Args:
        name: label of the RESULT line.
    """

    def __init__(self, name: str = "val_accuracy") -> None:
        self.name = name
        self.before: float | None = None
        self.after: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before is None:  # a resumed run keeps the figure measured when training began
            self.before = trainer.datamodule.evaluate(pl_module)["accuracy"]
            rank_zero_info(f"{self.name} before training: {self.before:.4f}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.after = trainer.datamodule.evaluate(pl_module)["accuracy"]
        for logger in trainer.loggers:
            logger.log_metrics({"report/accuracy_before": self.before, "report/accuracy_after": self.after},
                               step=trainer.global_step)
        rank_zero_info(f"RESULT {self.name} {self.before:.4f} {self.after:.4f}")

    def state_dict(self) -> dict:
        return {"before": self.before}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before = state_dict.get("before")
