"""StepProgressBar: training progress counted in optimizer steps, the way OPD runs are configured.

Lightning's bar counts batches of the current epoch ("Epoch 0/-2", "40/19" on a resumed run) and
shows the logger's ``v_num``; OPD runs are sized by ``trainer.max_steps`` and an epoch is only a pass
over the prompt list. The CLI installs this bar unless a progress bar is configured or
``trainer.enable_progress_bar`` is false.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

# What the bar shows, in this order, when logged (PolicyModule.log_rollout and on_train_batch_end).
BAR_KEYS = ("loss", "teacher_kl", "entropy", "len", "tok/s", "val/accuracy")


class StepProgressBar(TQDMProgressBar):
    """``train 120/600 [..., loss=0.41, teacher_kl=0.38, entropy=0.61, len=3.2, tok/s=1.2e+03]``:
    the global step out of ``max_steps`` (a resumed run continues from its step) and the key figures;
    other ``prog_bar`` metrics follow them. Validation keeps Lightning's own bar.

    Args: those of :class:`~lightning.pytorch.callbacks.TQDMProgressBar`.
    """

    @property
    def train_description(self) -> str:
        return "train"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=total_steps(trainer))
        # tqdm's rate counts from `initial`: a resumed run reports its own speed, not steps/elapsed.
        self.train_progress_bar.initial = self.train_progress_bar.n = trainer.global_step

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """One bar for the whole run: an epoch boundary does not reset it."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and not bar.disable and self._should_update(step, bar.total or 0):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar too

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The key figures first, then any other ``prog_bar`` metric; no ``v_num``."""
        logged = dict(trainer.progress_bar_metrics)
        ordered = {k: logged.pop(k) for k in BAR_KEYS if k in logged}
        return {**ordered, **logged}


def total_steps(trainer: L.Trainer) -> int | None:
    """``max_steps``, or the steps ``max_epochs`` amounts to; None (an open-ended bar) when unbounded."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return trainer.max_steps
    estimated = trainer.estimated_stepping_batches
    return int(estimated) if estimated != float("inf") else None
