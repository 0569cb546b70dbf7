"""One run, one folder: a launch of ``fit`` continues its logger's newest ``version_N`` folder, so
``--ckpt_path last`` finds the run's own ``last.ckpt`` (or stops, naming where it looked) and a resumed
run writes where the first did (its metrics.csv appended to). Used by the CLI's ``before_fit``."""

from __future__ import annotations

import csv
import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lit_opd.errors import CheckpointError


def pin_logger_versions(trainer: L.Trainer, new: bool) -> None:
    """A CSV/TensorBoard logger without a configured ``version`` continues its newest ``version_N``
    folder (``version_0`` the first time) instead of opening a new one per launch; ``new`` asks for
    the next one. Checkpoints without a ``dirpath`` live in that folder too, so they stay findable."""
    for logger in trainer.loggers:
        # `_version` is what the logger was given; `version` would already pick the next free one.
        if isinstance(logger, (CSVLogger, TensorBoardLogger)) and logger._version is None:
            following = logger._get_next_version()
            logger._version = following if new else max(following - 1, 0)


def checkpoint_dirs(trainer: L.Trainer) -> list[str]:
    """Where the trainer's ModelCheckpoints write (Lightning's rule: ``dirpath``, else the first
    logger's version folder, else ``default_root_dir``, each + ``checkpoints``)."""
    dirs = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.dirpath is not None:
            dirs.append(str(callback.dirpath))
        elif trainer.loggers:
            logger = trainer.loggers[0]
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            root = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            dirs.append(os.path.join(root, str(logger.name), version, "checkpoints"))
        else:
            dirs.append(os.path.join(trainer.default_root_dir, "checkpoints"))
    return list(dict.fromkeys(dirs))


def last_checkpoint(trainer: L.Trainer) -> str:
    """The newest ``last*.ckpt`` of the run's checkpoint folders; none is one error naming them
    (Lightning would warn and silently train from step 0)."""
    found = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            found |= callback._find_last_checkpoints(trainer)
    if found:
        return max(found, key=os.path.getmtime)
    where = ", ".join(checkpoint_dirs(trainer)) or "nowhere: the trainer has no ModelCheckpoint"
    raise CheckpointError(
        f"ckpt_path='last': no last.ckpt in {where}; nothing was loaded and training did not start. Resume "
        "with --ckpt_path PATH/TO/FILE.ckpt, or start fresh without --ckpt_path (a ModelCheckpoint needs "
        "save_last: true to write last.ckpt)."
    )


def continue_csv_metrics(trainer: L.Trainer) -> None:
    """A resumed run appends to its CSVLogger's metrics.csv: Lightning's CSV writer deletes a
    metrics.csv it finds (its folder was a new version per launch), so open the writer with the file
    set aside, then give it back with its header."""
    for logger in trainer.loggers:
        path = os.path.join(logger.log_dir, "metrics.csv") if isinstance(logger, CSVLogger) else None
        if path is None or trainer.global_rank != 0 or not os.path.isfile(path):
            continue
        aside = f"{path}.resuming"
        os.replace(path, aside)
        try:
            writer = logger.experiment
        finally:
            os.replace(aside, path)
        with open(path, newline="") as fh:
            writer.metrics_keys = next(csv.reader(fh), [])
