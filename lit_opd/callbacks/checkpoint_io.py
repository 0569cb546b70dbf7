"""Writing checkpoints so that no failure costs the user a good one: each file is replaced atomically,
never written from non-finite weights, and a write that fails (a full disk) says that the earlier file
is intact. :class:`~lit_opd.callbacks.HealthGuard` installs :class:`AtomicCheckpointIO` on the
strategy; an embedding project can pass it to the Trainer as a plugin itself
(``L.Trainer(plugins=[AtomicCheckpointIO()])``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from lit_opd.errors import CheckpointWriteFailed, NonFiniteError
from lit_opd.models import first_nonfinite


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made safe to kill and unable to save NaN.

    Lightning's ``_atomic_save`` serialises into memory and lets fsspec write a temporary file in
    the system temp directory, then ``shutil.move`` it: across filesystems that is a plain copy onto
    the target, and nothing is fsynced, so a kill or power cut can leave a truncated ``last.ckpt``.
    Here the file is written next to its target, fsynced, and ``os.replace``-d over it (atomic on
    POSIX and Windows), then the directory is fsynced: the target is always either the old or the
    new checkpoint. A write killed midway leaves a ``.NAME.*.partial`` file, removed by the next
    save of NAME. Remote paths (``s3://`` ...) keep Lightning's writer.

    A checkpoint whose ``state_dict`` holds NaN/inf is refused with :class:`NonFiniteError` before
    anything is written, so ModelCheckpoint cannot replace a good file with it (nor go on to delete
    the older one it would have superseded).
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        bad = first_nonfinite(checkpoint.get("state_dict", {}).items())
        if bad is not None:
            raise NonFiniteError(
                f"refusing to write checkpoint {path}: the weight {bad} holds NaN/inf. The file already "
                "there (if any) is kept."
            )
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)


def _is_local(path: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(path), LocalFileSystem)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same directory: fsync, ``os.replace``."""
    target = Path(str(path).removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.partial"):  # left by a killed earlier write
        with contextlib.suppress(OSError):
            stale.unlink()
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it private; keep the mode checkpoints usually have
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise write_failure(target, err) from err
        raise
    _fsync_directory(target.parent)


def write_failure(target: Path, err: OSError) -> CheckpointWriteFailed:
    """The one line for a checkpoint that could not be written: what the disk said, and that the
    file already there (the previous checkpoint of that name) was not touched."""
    kept = f"the earlier {target.name} there is intact" if target.exists() else "nothing was replaced"
    return CheckpointWriteFailed(
        f"Could not write checkpoint {target}: {err.strerror or err}; {kept} (and the run's other "
        f"checkpoints are untouched). Free space in {target.parent} or point the ModelCheckpoint's dirpath "
        "at a disk with room, then resume with --ckpt_path set to the newest checkpoint there"
    )


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def install_atomic_checkpoint_io(trainer: L.Trainer) -> None:
    """Swap the strategy's writer for :class:`AtomicCheckpointIO` when it is Lightning's default."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
