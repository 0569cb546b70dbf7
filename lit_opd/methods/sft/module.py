"""SFTModule: supervised fine-tuning on prompt + reference answer.

The baseline OPD is compared with, the way to warm-start a student, and how the quickstart's
teacher was trained. It uses the same RolloutDataModule: every training step's completions are
the dataset answers (``completion_source() == "dataset"``), and the loss is token cross-entropy
on them; validation decodes greedily like every other method.

Run: ``python -m lit_opd fit --config configs/sft/quickstart_sft.yaml``.
"""

from __future__ import annotations

import torch

from lit_opd.objectives import divergences as D
from lit_opd.methods.base import PolicyModule
from lit_opd.models import completion_logits
from lit_opd.types import RolloutBatch


class SFTModule(PolicyModule):
    """Cross-entropy on reference answers (teacher-forced), averaged over answer tokens.

    Args: see :class:`PolicyModule` (student, tokenizer, optimizer, scheduler).
    """

    def completion_source(self) -> str:
        return "dataset"

    def compute_loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        return self.loss(batch), {}

    def loss(self, batch: RolloutBatch) -> torch.Tensor:
        logits_BTV = completion_logits(self.student, batch)
        logp_BT = D.token_logprobs(logits_BTV, batch.completion_ids_BT)
        return -D.reduce_masked(logp_BT, batch.loss_mask_BT)
