"""A shuffling, rank-aware prompt sampler that resumes mid-epoch at the exact next prompt."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler


class ResumablePromptSampler(DistributedSampler):
    """Shuffles with ``seed + epoch``, gives rank r every world-size-th index, and on resume skips
    the ``resume_skip`` indices this rank already consumed in ``resume_epoch``. ``len()`` stays the
    full epoch, because Lightning's restored batch counter already includes the skipped batches.

    It subclasses ``DistributedSampler`` so Lightning keeps it under DDP instead of wrapping it.
    """

    def __init__(
        self, num_rows: int, seed: int, num_replicas: int, rank: int, resume_epoch: int = 0, resume_skip: int = 0
    ) -> None:
        super().__init__(
            range(num_rows), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        self.resume_epoch, self.resume_skip = resume_epoch, resume_skip

    def _skip(self) -> int:
        return self.resume_skip if self.epoch == self.resume_epoch else 0

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        indices = order.tolist()
        indices += indices[: self.total_size - len(indices)]  # pad so every rank gets as many
        mine = indices[self.rank : self.total_size : self.num_replicas]
        skip = self._skip()
        self.resume_skip = 0 if skip else self.resume_skip  # only the first pass over that epoch skips
        return iter(mine[skip:])

    def __len__(self) -> int:
        # The whole epoch, even when resuming: Lightning counts the restored batches towards it.
        return self.num_samples
