"""A shuffling, rank-aware prompt sampler that resumes mid-epoch at the exact next prompt."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler

from lit_opd.errors import SettingError


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


class GroupedPromptSampler(ResumablePromptSampler):
    """:class:`ResumablePromptSampler` over *groups* of rows (the turns of one trajectory, OPAD).

    Each epoch shuffles the groups with ``seed + epoch`` (every rank draws the same order), deals
    whole groups to ranks — each group to the rank holding the fewest rows so far, ties to the lowest
    rank — and yields a rank's groups one after another, each group's rows in the order given (turn
    order). A group is never split between ranks, and its rows stay contiguous and in order.

    Ranks must yield as many rows as each other (DDP steps in lockstep), and ``len()`` must not change
    between epochs, so every rank's list is cycled from its start up to a fixed length:
    ``ceil((rows + longest group × (ranks − 1)) / ranks)``, a bound on the busiest rank. With one
    rank that is the row count: no row repeats. Resume skips ``resume_skip`` of a rank's rows in
    ``resume_epoch``, as the ungrouped sampler does.
    """

    def __init__(
        self, groups: list[list[int]], seed: int, num_replicas: int, rank: int, resume_epoch: int = 0,
        resume_skip: int = 0,
    ) -> None:
        if not all(groups) or len(groups) < num_replicas:
            raise SettingError(f"GroupedPromptSampler deals whole groups to {num_replicas} rank(s) but got "
                             f"{len(groups)} group(s) (empty ones included); add trajectories or use fewer "
                             "devices")
        num_rows = sum(len(g) for g in groups)
        super().__init__(num_rows, seed, num_replicas, rank, resume_epoch, resume_skip)
        self.groups = [list(g) for g in groups]
        longest = max(len(g) for g in groups)
        # Every rank computes the same length from the same inputs: -(-a // b) is ceil(a / b).
        self.num_samples = -(-(num_rows + longest * (num_replicas - 1)) // num_replicas)
        self.total_size = self.num_samples * num_replicas

    def rank_rows(self, epoch: int) -> list[list[int]]:
        """Each rank's rows for ``epoch``, before padding: whole groups in shuffled order."""
        order = torch.randperm(len(self.groups), generator=torch.Generator().manual_seed(self.seed + epoch))
        rows: list[list[int]] = [[] for _ in range(self.num_replicas)]
        for g in order.tolist():
            lightest = min(range(self.num_replicas), key=lambda r: (len(rows[r]), r))
            rows[lightest] += self.groups[g]
        return rows

    def __iter__(self) -> Iterator[int]:
        mine = self.rank_rows(self.epoch)[self.rank]  # not empty: there are at least as many groups as ranks
        mine = (mine * (self.num_samples // len(mine) + 1))[: self.num_samples]
        skip = self._skip()
        self.resume_skip = 0 if skip else self.resume_skip
        return iter(mine[skip:])


def row_groups(records: list[dict], group_field: str, split: str) -> list[list[int]]:
    """Indices of ``records`` (each with its source ``row``, as PromptTokenizer encodes them) grouped by
    ``row[group_field]``, groups in order of first appearance, each group's indices ordered by the
    row's ``turn_index`` (when rows have one) and then by position."""
    groups: dict[object, list[int]] = {}
    for index, record in enumerate(records):
        row = record["row"]
        if group_field not in row:
            raise SettingError(f"RolloutDataModule.group_field={group_field!r}: {split} row {index} has no "
                             f"{group_field!r} field; give every row one (TurnPrompts does) or set "
                             "group_field: null")
        groups.setdefault(row[group_field], []).append(index)
    turn = [record["row"].get("turn_index", 0) for record in records]
    return [sorted(members, key=lambda i: (turn[i], i)) for members in groups.values()]
