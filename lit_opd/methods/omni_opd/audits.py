"""Where the teacher is asked: the peak-entropy picker, and the loop detector of the rollout logs.

The picker audits the student where it is least sure of its next token: a chunk of C tokens starts
at each of the highest-entropy positions, greedily, so that chunks do not overlap.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: A completion "loops" when one n-gram (1 ≤ n ≤ LOOP_MAX_N) repeats back to back at least
#: LOOP_MIN_REPEATS times over at least LOOP_MIN_SPAN tokens (see :func:`repetition_loops`).
LOOP_MAX_N, LOOP_MIN_REPEATS, LOOP_MIN_SPAN = 16, 3, 12


def chunk_starts_allowed(mask_BT: Tensor, chunk_tokens: int) -> Tensor:
    """bool (B, T): True at t when all of t .. t+C−1 are loss-mask tokens (a chunk may not run past
    the end of the completion or into tokens that are not trained on)."""
    mask_BT = mask_BT.bool()
    B, T = mask_BT.shape
    allowed_BT = torch.zeros_like(mask_BT)
    if chunk_tokens > T:
        return allowed_BT
    csum_BT1 = torch.nn.functional.pad(mask_BT.long().cumsum(-1), (1, 0))  # csum[t] = Σ_{s<t} mask
    inside_BT = csum_BT1[:, chunk_tokens:] - csum_BT1[:, : T + 1 - chunk_tokens]
    allowed_BT[:, : T + 1 - chunk_tokens] = inside_BT == chunk_tokens
    return allowed_BT


def pick_audits(entropy_BT: Tensor, mask_BT: Tensor, chunk_tokens: int, max_audits: int) -> list[list[int]]:
    """Chunk starts per row, in increasing order: up to ``max_audits`` non-overlapping chunks of
    ``chunk_tokens`` tokens, taken greedily from the highest entropy down (ties: the later position).

    A row with fewer than ``chunk_tokens`` loss-mask tokens in a run gets no audit; a row with room
    for fewer chunks than ``max_audits`` gets as many as fit around the higher peaks.
    """
    allowed_BT = chunk_starts_allowed(mask_BT, chunk_tokens).cpu()
    entropy_BT = entropy_BT.detach().float().cpu()
    starts: list[list[int]] = []
    for allowed_T, entropy_T in zip(allowed_BT, entropy_BT):
        candidates = allowed_T.nonzero().flatten().flip(0)  # latest first: the stable sort keeps ties so
        order = torch.argsort(entropy_T[candidates], descending=True, stable=True)
        taken: list[int] = []
        busy = [False] * allowed_T.shape[0]
        for t in candidates[order].tolist():
            if any(busy[t : t + chunk_tokens]):
                continue
            taken.append(t)
            busy[t : t + chunk_tokens] = [True] * chunk_tokens
            if len(taken) == max_audits:
                break
        starts.append(sorted(taken))
    return starts


def chunk_mask(
    starts: list[list[int]], shape: tuple[int, int], chunk_tokens: int, device: torch.device
) -> Tensor:
    """bool (B, T): True on the tokens of the chunks that start at ``starts`` (one list per row)."""
    mask_BT = torch.zeros(shape, dtype=torch.bool)
    for b, row in enumerate(starts):
        for t in row:
            mask_BT[b, t : t + chunk_tokens] = True
    return mask_BT.to(device)


def repetition_loops(
    ids_BT: Tensor, mask_BT: Tensor, max_n: int = LOOP_MAX_N, min_repeats: int = LOOP_MIN_REPEATS,
    min_span: int = LOOP_MIN_SPAN,
) -> Tensor:
    """bool (B,): True for completions that contain a repetition loop.

    A loop is a stretch of at least ``min_span`` completion tokens made of one n-gram (n ≤ ``max_n``)
    repeated back to back at least ``min_repeats`` times, e.g. "ab ab ab ab ab ab" (n = 2). The
    stretch is n-periodic, so it shows as a run of r consecutive positions with y_t = y_{t+n};
    the stretch is then r + n tokens long and holds (r + n)/n copies of the n-gram.
    """
    mask_BT = mask_BT.bool()
    B, T = ids_BT.shape
    found_B = torch.zeros(B, dtype=torch.bool, device=ids_BT.device)
    for n in range(1, min(max_n, T - 1) + 1):
        need = max(n * (min_repeats - 1), min_span - n)  # run length r of y_t = y_{t+n}
        if need > T - n:
            continue
        same_BT = (ids_BT[:, n:] == ids_BT[:, :-n]) & mask_BT[:, n:] & mask_BT[:, :-n]
        found_B |= _longest_run(same_BT) >= need
    return found_B


def _longest_run(flags_BT: Tensor) -> Tensor:
    """Length of the longest run of True per row: (B,). The run ending at t is t minus the last
    position ≤ t that is False (a running max of those positions)."""
    B, T = flags_BT.shape
    if T == 0:
        return torch.zeros(B, dtype=torch.long, device=flags_BT.device)
    index_T = torch.arange(T, device=flags_BT.device)
    last_false_BT = torch.where(flags_BT, -1, index_T).cummax(-1).values
    return (index_T - last_false_BT).max(-1).values
