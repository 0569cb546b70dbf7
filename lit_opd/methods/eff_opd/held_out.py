"""EffOPD's held-out scores: the method's own loss on held-out student rollouts, drawn under a fixed
seed that leaves the training RNG streams where they were (the callback's ``score="loss"``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import lightning as L
import torch

from lit_opd.methods.eff_opd.parameters import policy_of
from lit_opd.rollout.datamodule import RolloutDataModule
from lit_opd.types import RolloutBatch


def loss_score(pl_module: L.LightningModule, batches: Sequence[RolloutBatch]) -> float:
    """− mean over ``batches`` of the method's own loss against its teacher (no grad)."""
    total = 0.0
    for batch in batches:
        total += float(pl_module.score_loss(batch))
    return -total / len(batches)


@contextlib.contextmanager
def scoring_context(pl_module: L.LightningModule, seed: int) -> Iterator[None]:
    """No grad, the student in eval mode, and a fixed seed whose draws leave the training RNG
    streams exactly where they were."""
    device = pl_module.device
    policy = policy_of(pl_module)
    modes = {m: m.training for m in policy.modules()}
    devices = [] if device.type == "cpu" else [device]
    device_type = "cuda" if device.type == "cpu" else device.type
    with torch.random.fork_rng(devices=devices, device_type=device_type), torch.no_grad():
        torch.manual_seed(seed)
        policy.eval()
        try:
            yield
        finally:
            for module, training in modes.items():
                module.train(training)


def held_out_rollouts(
    datamodule: RolloutDataModule, pl_module: L.LightningModule, seed: int, max_batches: int | None = None
) -> list[RolloutBatch]:
    """The student's rollouts of ``datamodule``'s validation prompts (at most ``max_batches``
    batches), drawn inside :func:`scoring_context`: the held-out batches of the loss score."""
    rollouts = []
    with scoring_context(pl_module, seed):
        for i, batch in enumerate(datamodule.val_dataloader()):
            if i == max_batches:
                break
            rollouts.append(datamodule.rollout(batch.to(pl_module.device), pl_module, "student", 0))
    return rollouts
