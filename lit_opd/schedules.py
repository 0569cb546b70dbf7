"""Learning-rate schedules usable from YAML (``scheduler: {class_path: lit_opd.schedules.WarmupCosine}``)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from lit_opd.errors import SettingError


class WarmupCosine(LambdaLR):
    """Linear warm-up to the optimizer's lr over ``warmup_steps``, then cosine decay to
    ``min_ratio × lr`` at ``total_steps`` (held there afterwards). Stepped once per optimizer step."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
    ) -> None:
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise SettingError(
                f"WarmupCosine needs 0 <= warmup_steps <= total_steps and total_steps >= 1, got "
                f"warmup_steps={warmup_steps}, total_steps={total_steps}"
            )
        self.total_steps, self.warmup_steps, self.min_ratio = total_steps, warmup_steps, min_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
