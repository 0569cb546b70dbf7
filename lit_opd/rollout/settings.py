"""The RolloutDataModule's settings checked against its data and its model: the validation split's
size, seeds torch accepts whatever the user's ``seed``, and prompts that fit the student's positions."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from lit_opd.errors import SettingError

# torch.Generator.manual_seed takes [-2**63, 2**64) and reads a negative seed modulo 2**64.
GENERATOR_SEEDS = (-(2**63), 2**64)


def generator_seed(value: int) -> int:
    """``value`` where ``manual_seed`` takes it, else ``value mod 2**64`` (the same stream torch would
    draw if it wrapped): any int works, and a seed that worked before keeps its exact stream."""
    low, high = GENERATOR_SEEDS
    return value if low <= value < high else value % high


def data_seed(seed: int) -> int:
    """The data ``seed`` as shuffling uses it: itself below 2**63, else ``seed mod 2**63`` (room left
    for the per-epoch ``seed + epoch``)."""
    return seed if -(2**63) <= seed < 2**63 else seed % 2**63


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed unique to (seed, global step, rank): what a step samples (rollouts, a teacher's text)
    is fixed by it, so a resumed run draws exactly what the unbroken run drew."""
    return generator_seed((seed * 1_000_003 + step) * 4099 + rank)


def rollout_seed(seed: int, step: int, rank: int, source: str) -> int:
    """A generator seed unique to (seed, step, rank, source) and stable across processes
    (unlike ``hash`` of a string, which Python randomises per process)."""
    code = ("student", "teacher", "greedy").index(source)
    return generator_seed(((seed * 1_000_003 + step) * 4099 + rank) * 4 + code)


def check_batch_sizes(batch_size: int, val_batch_size: int | None) -> None:
    """Both at least 1 (None: validation uses ``batch_size``)."""
    for name, size in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
        if size is not None and size < 1:
            raise SettingError(f"RolloutDataModule.{name} must be >= 1, got {size}")


def check_val_size(val_size: object) -> None:
    """A fraction in [0, 1) or a whole count >= 0 (0 disables validation); nothing in between."""
    count = isinstance(val_size, numbers.Integral) and not isinstance(val_size, bool) and val_size >= 0
    fraction = isinstance(val_size, float) and 0.0 <= val_size < 1.0
    if not (count or fraction):
        raise SettingError(
            f"RolloutDataModule.val_size={val_size!r} is neither a fraction below 1 (e.g. 0.1) nor a whole "
            "number of rows written without a decimal point (e.g. 10); use one of those "
            "(0 disables validation)"
        )


def split_validation(
    groups: list[list[int]], val_size: int | float, seed: int, unit: str
) -> tuple[list[int], list[int]]:
    """(training indices sorted, validation indices): ``val_size`` of ``groups`` (a count, or a fraction
    of them, at least 1) drawn with ``seed``, each group whole on one side."""
    n_val = int(val_size) if isinstance(val_size, numbers.Integral) else max(1, round(len(groups) * val_size))
    if n_val >= len(groups):
        raise SettingError(
            f"RolloutDataModule.val_size={val_size} leaves no training {unit} out of {len(groups)}; "
            "lower val_size or pass val_source"
        )
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(data_seed(seed))).tolist()
    return sorted(i for g in order[n_val:] for i in groups[g]), [i for g in order[:n_val] for i in groups[g]]


def max_positions(policy: nn.Module | None) -> int | None:
    """The student's ``config.max_position_embeddings``, or None when it declares none."""
    limit = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def check_positions(records: list[dict], names: list[str], limit: int | None, max_new_tokens: int,
                    setting: str) -> None:
    """Refuse when the longest prompt plus ``max_new_tokens`` (named ``setting``) needs more positions
    than the student has (``limit``): beyond it the model fails or silently degrades."""
    if limit is None or not records:
        return
    longest = max(records, key=lambda r: len(r["prompt_ids"]))
    n = len(longest["prompt_ids"])
    if n + max_new_tokens <= limit:
        return
    if max_new_tokens >= limit:
        raise SettingError(f"{setting}={max_new_tokens} leaves no room for a prompt within the student's "
                         f"max_position_embeddings={limit}; lower {setting}")
    raise SettingError(
        f"{names[longest['row_index']]} has a {n}-token prompt: with {setting}={max_new_tokens} it needs "
        f"{n + max_new_tokens} positions, more than the student's max_position_embeddings={limit}; set "
        f"max_prompt_tokens to at most {limit - max_new_tokens} (with over_long_prompts 'truncate' or "
        f"'skip') or lower {setting}"
    )
