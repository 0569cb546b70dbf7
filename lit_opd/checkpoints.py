"""What a lit_opd checkpoint records to be known again, and the checks run before anything from it
is loaded: by a resume (``fit --ckpt_path``), by ``validate`` / ``test --ckpt_path`` and by ``export``.

* **Checksums.** At save, a sha256 of every student tensor (its dtype, shape and raw bytes; keys
  sorted) goes to ``checkpoint["lit_opd"]["checksums"]``. A file changed on disk since (a flipped
  block, a bad copy) is refused naming its first tensor that differs. Checkpoints written before
  checksums existed load with a note. Sharded tensors (FSDP's distributed checkpoints) are not
  hashed: their checkpoint is a folder of shards that carries no record.
* **Architecture.** A checkpoint whose student is another architecture than the configured one is
  refused naming both (what the configs say, else the first tensor whose shape differs).
* **Settings.** :func:`settings_changes` lists how the student spec and the objective differ from
  the checkpoint's; a method refuses a resume with any unless ``allow_settings_change``. A setting
  the checkpoint does not record (added to lit_opd since) counts as unchanged at its default.

Every lit_opd checkpoint is read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_opd.errors import (
    CheckpointError,
    UnsafeCheckpoint,
    damaged_checkpoint,
    damaged_checkpoint_message,
    unsafe_checkpoint_message,
    weights_only_refusal,
)
from lit_opd.models import ModelSpec

ALGORITHM = "sha256"
# hashlib releases the GIL on large buffers: a few threads hash a large model's tensors in parallel.
_HASH_THREADS = max(1, min(4, os.cpu_count() or 1))
# ModelSpec fields that change what is trained; loading details (attention kernel, trust_remote_code,
# random_init: the weights come from the checkpoint) may differ on resume.
STUDENT_KEYS = ("path", "revision", "dtype", "quantization", "tokenizer")
# Config entries that describe a transformers architecture, in the order they are reported.
ARCH_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
)
_LIGHTNING_KEYWORDS = ("last", "best", "hpc")


# ----- reading ---------------------------------------------------------------------------------
def read_checkpoint(
    path: str | Path, subject: str, consequence: str = "nothing was loaded", mmap: bool = False
) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU; a damaged file or one that holds other
    Python objects is a :class:`CheckpointError` / :class:`UnsafeCheckpoint` naming ``subject``.
    ``mmap``: map the tensors instead of reading them (to look at the checkpoint's small entries)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        damage = damaged_checkpoint(err)
        if damage is not None:
            raise CheckpointError(damaged_checkpoint_message(subject, damage, consequence)) from err
        if isinstance(err, pickle.UnpicklingError) and weights_only_refusal(err) is not None:
            raise UnsafeCheckpoint(unsafe_checkpoint_message(subject, err)) from err
        raise


def check_ckpt_path(path: str | None) -> None:
    """A ``--ckpt_path`` that names a file must exist (Lightning's keywords and URLs are its own)."""
    if not path or path in _LIGHTNING_KEYWORDS or path.startswith("registry") or "://" in path:
        return
    if not os.path.exists(path):
        raise CheckpointError(
            f"ckpt_path={path!r} does not exist; nothing was loaded. Check the path "
            "(`--ckpt_path last` resumes from the run's newest last.ckpt)."
        )


def subject_of(trainer: Any) -> str:  # noqa: ANN401 - a Lightning Trainer, or None
    """How messages name the checkpoint being loaded: ``ckpt_path='…'`` when the trainer knows it."""
    path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
    return f"ckpt_path={str(path)!r}" if path else "This checkpoint"


# ----- checksums -------------------------------------------------------------------------------
def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (a CPU copy first when it lives elsewhere)."""
    data = tensor.detach()
    data = data if data.device.type == "cpu" else data.cpu()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        return dict(zip(tensors, pool.map(tensor_digest, tensors.values()), strict=True))


def _hashable(value: Any) -> bool:  # noqa: ANN401
    return type(value) in (torch.Tensor, torch.nn.Parameter) and not value.is_meta


def record_checksums(state: Mapping[str, Any]) -> dict | None:
    """``{"algorithm": "sha256", "tensors": {key: hex}}`` over ``state``'s tensors (sorted keys), or
    None when some are sharded / subclassed tensors whose bytes are not all here."""
    tensors = {k: v for k, v in sorted(state.items()) if isinstance(v, torch.Tensor)}
    if not all(_hashable(v) for v in tensors.values()):
        return None
    return {"algorithm": ALGORITHM, "tensors": _digests(tensors)}


def verify_checksums(
    info: Mapping, state: Mapping[str, Any], subject: str, consequence: str = "nothing was loaded"
) -> bool:
    """Check ``state`` against the checksums in ``info`` (a checkpoint's ``lit_opd`` entry). Raises
    :class:`CheckpointError` naming the first tensor (sorted keys) that differs, is missing or was
    added; returns False, with a note, when the checkpoint records none."""
    record = info.get("checksums")
    if not record or record.get("algorithm") != ALGORITHM:
        rank_zero_info(
            f"note: {subject} records no checksums of its tensors (saved before lit_opd recorded "
            "them, or sharded); it is used without that check."
        )
        return False
    saved: dict[str, str] = record["tensors"]
    tensors = {k: v for k, v in sorted(state.items()) if k in saved and isinstance(v, torch.Tensor)}
    found = _digests(tensors)
    fix = f"{consequence}. Use another checkpoint, e.g. an earlier one of the same run."
    for key in sorted(saved.keys() | {k for k, v in state.items() if isinstance(v, torch.Tensor)}):
        if key not in saved:
            raise CheckpointError(f"{subject} holds a tensor {key!r} that was not in it when saved; {fix}")
        if key not in found:
            raise CheckpointError(f"{subject} lacks the tensor {key!r} it was saved with; {fix}")
        if found[key] != saved[key]:
            raise CheckpointError(
                f"{subject} is corrupted: its tensor {key!r} differs from the {ALGORITHM} "
                f"recorded when it was saved (the file changed since); {fix}"
            )
    return True


# ----- architecture ----------------------------------------------------------------------------
def _describe(config: Mapping, keys: list[str]) -> str:
    shown = ", ".join(f"{k} {config.get(k)}" for k in keys if k != "model_type")
    return f"{config.get('model_type')}" + (f" ({shown})" if shown else "")


def architecture_mismatch(
    saved_config: Mapping | None,
    current_config: Mapping | None,
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
) -> str | None:
    """How the checkpoint's student differs in architecture from the configured one, or None. Judged
    on the configs' :data:`ARCH_KEYS` first, then on the shapes of the tensors both hold."""
    if saved_config and current_config:
        differ = [k for k in ARCH_KEYS if k in saved_config and saved_config.get(k) != current_config.get(k)]
        if differ:
            keys = ["model_type", *[k for k in differ if k != "model_type"]]
            return (
                f"a student of another architecture: {_describe(saved_config, keys)} in the checkpoint, "
                f"{_describe(current_config, keys)} configured"
            )
    for key, value in sorted(saved.items()):
        other = current.get(key)
        if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and value.shape != other.shape:
            return (
                f"a student of another architecture: its tensor {key!r} has shape {list(value.shape)}, "
                f"the configured student's {list(other.shape)}"
            )
    return None


# ----- settings ----------------------------------------------------------------------------------
_SPEC_DEFAULTS = {f.name: f.default for f in fields(ModelSpec) if f.default is not MISSING}
_ABSENT = object()


def _same(key: str, old: Any, new: Any) -> bool:  # noqa: ANN401
    if key in ("path", "tokenizer") and isinstance(old, str) and isinstance(new, str):
        return os.path.normpath(old) == os.path.normpath(new)
    return old == new


def _student_changes(saved: Mapping | None, current: Mapping | None) -> list[str]:
    if not saved or not current:  # the student was an nn.Module: nothing recorded to compare
        return []
    changes = []
    for key in STUDENT_KEYS:
        old, new = saved.get(key, _SPEC_DEFAULTS.get(key)), current.get(key)
        if not _same(key, old, new):
            changes.append(f"student {key} {old!r} -> {new!r}")
    return changes


def objective_defaults(objective: Any) -> dict[str, Any]:  # noqa: ANN401 - an Objective
    """The constructor defaults of ``objective``'s class, keyed like its ``settings()``."""
    cls = objective.component_class()
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _objective_changes(
    saved: Mapping | None, current: Mapping | None, defaults: Mapping[str, Any]
) -> list[str]:
    if saved is None and current is None:
        return []
    if saved is None or current is None or saved.get("class") != current.get("class"):
        return [f"objective class {(saved or {}).get('class')} -> {(current or {}).get('class')}"]
    changes = []
    for key, new in current.items():
        old = saved.get(key, _ABSENT)
        if old is _ABSENT:  # a setting newer than the checkpoint: unchanged when at its default
            old = defaults.get(key, new)
        if old != new:
            changes.append(f"objective {key} {old!r} -> {new!r}")
    return changes


def settings_changes(
    info: Mapping,
    student: Mapping | None,
    objective: Mapping | None = None,
    defaults: Mapping[str, Any] | None = None,
    compare_objective: bool = False,
) -> list[str]:
    """How the student spec identity (and, with ``compare_objective``, the objective's ``settings()``)
    differ from those recorded in ``info`` (a checkpoint's ``lit_opd`` entry), as short phrases."""
    changes = _student_changes(info.get("student_spec"), student)
    if compare_objective:
        changes += _objective_changes(info.get("objective"), objective, defaults or {})
    return changes


def settings_change_message(subject: str, changes: list[str]) -> str:
    return (
        f"{subject} was trained with other settings: {'; '.join(changes)}. Resume with the same "
        "settings, or set allow_settings_change: true to continue with the new ones on purpose."
    )


def hparam_changes(saved: dict, given: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The method settings (plain hyperparameters, e.g. ``lmbda``) whose value for this run differs from
    the checkpoint's, as "name saved -> given" phrases; keys in ``ignore`` are not compared."""
    return [f"{key} {_plain(saved[key])!r} -> {_plain(value)!r}" for key, value in given.items()
            if key not in ignore and key in saved and _plain(saved[key]) != _plain(value)]


def _plain(value: object) -> object:
    """A config value as plain data, so a tuple read from YAML equals the list saved in a checkpoint."""
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
