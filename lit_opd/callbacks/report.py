"""AccuracyReport: greedy validation accuracy before and after training, as one RESULT line;
RunSummary: what a finished ``fit`` did and where it left its files."""

from __future__ import annotations

import os

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


class RunSummary(L.Callback):
    """When ``fit`` ends, a few lines instead of Lightning's bare "``Trainer.fit`` stopped": the steps
    done, the last and best validation score, where the checkpoints and logs are, and the command that
    exports the student. The CLI installs it by default.

    Args:
        metric: the validation metric to report (logged by the method's validation).
    """

    def __init__(self, metric: str = "val/accuracy") -> None:
        self.metric = metric
        self.best: tuple[float, int] | None = None  # (value, global step)
        self.last: tuple[float, int] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        self.last = (float(value), trainer.global_step)
        if self.best is None or self.last[0] > self.best[0]:
            self.best = self.last

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info("\n".join(self.summary_lines(trainer)))

    def summary_lines(self, trainer: L.Trainer) -> list[str]:
        from lightning.pytorch.callbacks import ModelCheckpoint

        total = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        lines = [f"run summary: {trainer.global_step}{total} steps"]
        if self.last is not None:
            lines.append(f"  {self.metric}: last {self.last[0]:.4f} (step {self.last[1]}), "
                         f"best {self.best[0]:.4f} (step {self.best[1]})")
        saved = [(name, path) for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
                 for name, path in (("last", cb.last_model_path), ("best", cb.best_model_path)) if path]
        for name, path in dict.fromkeys(saved):
            lines.append(f"  {name} checkpoint: {path}")
        if trainer.log_dir:
            lines.append(f"  logs: {trainer.log_dir}")
        if saved:
            out = os.path.join(trainer.default_root_dir, "export")
            lines.append(f"  export: python -m lit_opd export --ckpt_path {saved[0][1]} --out {out}")
        else:
            lines.append("  no checkpoint was written (add a ModelCheckpoint to trainer.callbacks)")
        return lines

    def state_dict(self) -> dict:
        return {"best": self.best, "last": self.last}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.last = state_dict.get("best"), state_dict.get("last")
