"""Errors the user can fix, told apart from bugs, and the one-line form the CLI prints them in.

What counts as the user's error (:func:`find_user_error`):

* a :class:`UserError`, wherever it is raised: every check of the user's input in lit_opd raises one
  (:class:`SettingError` for a bad setting or row, :class:`MissingFile`, :class:`UnusablePath`,
  :class:`MissingExtra`, :class:`NonFiniteError`, the checkpoint errors ...), and its message names the
  setting and the fix;
* Lightning's ``MisconfigurationException`` (its verdict on the trainer's settings);
* either of the above wrapped by jsonargparse while it builds the objects of a config;
* torch's refusal to load a checkpoint with ``weights_only=True`` (an ``UnpicklingError`` that starts
  "Weights only load failed"), anywhere in the exception chain: the file holds pickled Python objects
  that could run code (:func:`weights_only_refusal`). Other unpickling errors stay bugs;
* torch failing to read a damaged or truncated checkpoint (no zip central directory, a garbled index,
  an empty file: :func:`damaged_checkpoint`), anywhere in the exception chain.

Everything else (a ``TypeError``, ``KeyError``, ``RuntimeError``, or a plain ``ValueError`` — raised
inside torch / transformers or by a bug in lit_opd itself) is treated as a bug and keeps its traceback. ``LIT_OPD_DEBUG=1`` shows the
traceback of user errors too.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import struct
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

DEBUG_ENV = "LIT_OPD_DEBUG"
DEBUG_HINT = f"(set {DEBUG_ENV}=1 to see the traceback)"
NONFINITE_ADVICE = (
    "Lower the learning rate or set trainer.gradient_clip_val (e.g. 1.0); trainer.detect_anomaly=true "
    "finds the operation that made the first NaN (slow: for debugging only)."
)


class UserError(Exception):
    """An error whose fix lies in the run's settings or data, not in lit_opd's code: the CLI prints
    its message alone, without a traceback."""


class SettingError(UserError, ValueError):
    """A setting, an input row or a file's content the user gave is wrong; the message names it and the
    fix. Every check of the user's input in lit_opd raises this (or another UserError): a ValueError
    that is not one is a bug and keeps its traceback."""


class MissingFile(UserError, FileNotFoundError):
    """A path the user gave does not exist; the message names the setting."""


class UnusablePath(UserError, OSError):
    """A path the user gave cannot be used as it is: a directory where a file is wanted, an occupied
    output folder, no permission, a failing read."""


class MissingExtra(UserError, ImportError):
    """A feature the user turned on needs an optional package; the message names the extra."""


class TeacherUnreachable(UserError, RuntimeError):
    """A remote teacher cannot answer at setup (server down, wrong URL or model, refused key or k):
    the message names the URL and the fix."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced NaN or inf (loss, gradients, weights or the rollout's logits).

    The message is built from its parts so that whoever knows more than the raiser (the
    :class:`~lit_opd.callbacks.HealthGuard` knows the step and the settings) can add them with
    :meth:`add_context` before it reaches the user.
    """

    def __init__(
        self, problem: str, step: int | None = None, suspects: str = "", advice: str = NONFINITE_ADVICE
    ) -> None:
        super().__init__(problem)
        self.problem, self.step, self.suspects, self.advice = problem, step, suspects, advice

    def add_context(self, step: int, suspects: str) -> None:
        """Add the step (unless the raiser knew it) and the settings with their values, which the
        caller knows better than a raiser deep inside the rollout."""
        self.step = self.step if self.step is not None else step
        self.suspects = suspects or self.suspects

    def __reduce__(self):  # noqa: ANN204 - keep every part across processes (spawned DDP ranks)
        return type(self), (self.problem, self.step, self.suspects, self.advice)

    def __str__(self) -> str:
        where = f"At global step {self.step}: " if self.step is not None else ""
        parts = [f"{where}{self.problem}"]
        if self.suspects:
            parts.append(f"Settings most likely at fault: {self.suspects}.")
        if self.advice:
            parts.append(self.advice)
        return " ".join(parts)


class UnsafeCheckpoint(UserError, pickle.UnpicklingError):
    """A checkpoint that holds pickled Python objects besides tensors and plain data (loading it could
    run code), refused by ``torch.load(..., weights_only=True)`` before anything in it ran."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used as it is — missing, damaged, corrupted since it was saved, of
    another architecture, or made with other settings — refused before anything from it is loaded.
    The message names the file itself, so the CLI prints it as it is."""


class ExportFailed(UserError, OSError):
    """``export`` could not write its output (e.g. the disk is full); ``--out`` was left as it was."""


class CheckpointWriteFailed(UserError, OSError):
    """A checkpoint could not be written (e.g. the disk is full); the file already at its path, if
    any, was left as it was. The message names both."""


# ----- telling user errors apart --------------------------------------------------------------
def raised_in(err: BaseException, directory: Path | str) -> bool:
    """Whether the innermost frame of ``err``'s traceback (where it was raised) lies under ``directory``."""
    frames = traceback.extract_tb(err.__traceback__) if err.__traceback__ is not None else []
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(directory)


def is_user_error(err: BaseException) -> bool:
    """The user's by declaration: a :class:`UserError` (lit_opd's checks raise nothing else for the
    user's input) or Lightning's verdict on the trainer's settings. Where an error is raised does not
    count: a ValueError from a bug inside lit_opd keeps its traceback."""
    return isinstance(err, UserError) or lightning_misconfiguration(err)


def lightning_misconfiguration(err: BaseException) -> bool:
    """Lightning's own verdict on the trainer's settings (``accelerator: gpu`` with no GPU, more
    ``devices`` than there are): its message names the setting."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return isinstance(err, MisconfigurationException)


def misconfiguration_message(err: BaseException) -> str:
    """Lightning's message, with what this machine has when it is about the accelerator."""
    import torch

    message = str(err).strip()
    if re.search(r"gpu|cuda|accelerator|devices", message, re.IGNORECASE) and not torch.cuda.is_available():
        built = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device visible"
        message += (f" (this machine has {built}); set trainer.accelerator to cpu or auto, or run on a machine "
                    "with a GPU and a CUDA build of torch")
    return f"trainer: {message}"


def find_user_error(err: BaseException) -> BaseException | None:
    """``err`` itself when it is the user's, or the user error jsonargparse wrapped in it, else None."""
    import jsonargparse

    wrapper_dir = Path(jsonargparse.__file__).resolve().parent
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if is_user_error(err):
            return err
        if not raised_in(err, wrapper_dir):
            return None
        err = err.__cause__
    return None


# ----- checkpoints torch refuses to unpickle ---------------------------------------------------
WEIGHTS_ONLY_REFUSAL = "Weights only load failed"


def weights_only_refusal(err: BaseException | None) -> BaseException | None:
    """torch's refusal to unpickle a file with ``weights_only=True`` (the file holds other Python
    objects) anywhere in ``err``'s chain, else None. Other unpickling errors are not matched."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, pickle.UnpicklingError) and str(err).startswith(WEIGHTS_ONLY_REFUSAL):
            return err
        err = err.__cause__ or err.__context__
    return None


def unsafe_checkpoint_message(subject: str, refusal: BaseException | None = None) -> str:
    """The one line for a refused checkpoint; ``subject`` names the file (e.g. ``ckpt_path='x.ckpt'``)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(refusal)) if refusal is not None else None
    example = f" (first found: {found.group(1)})" if found else ""
    return (f"{subject} holds Python objects other than tensors and plain data{example}, which could run "
            "code when loaded; nothing from it was run or loaded. Use a checkpoint written by lit_opd or by "
            "a source you trust.")


def _loaded_by_lightning(err: BaseException) -> bool:
    """Whether the code that called ``torch.load`` (the last frame outside torch) is Lightning's, i.e.
    the refused file is the run's ``ckpt_path`` and not, say, a callback's own file."""
    import lightning
    import torch

    torch_dir, lightning_dir = (Path(m.__file__).resolve().parent for m in (torch, lightning))
    frames = traceback.extract_tb(err.__traceback__) if err.__traceback__ is not None else []
    callers = [Path(f.filename).resolve() for f in frames]
    callers = [f for f in callers if not f.is_relative_to(torch_dir)]
    return bool(callers) and callers[-1].is_relative_to(lightning_dir)


def _refused_subject(refusal: BaseException) -> str:
    path = _SETTINGS.get("ckpt_path")
    if path and _loaded_by_lightning(refusal):
        return f"ckpt_path={path!r}"
    return "A file that torch.load read with weights_only=True"


# ----- checkpoints torch cannot read -----------------------------------------------------------
# torch.load's own files: an error raised in them while reading is about the file's bytes.
_TORCH_READERS = ("serialization.py", "_weights_only_unpickler.py")
# Reasons of a weights-only refusal that mean garbled bytes, not a pickled Python object.
_GARBLED = ("Unsupported operand", "String is too long", "negative argument", "unsupported persistent id")
_UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, KeyError, ValueError, IndexError, struct.error)


def _refusal_reason(err: BaseException) -> str:
    """The WeightsUnpickler's own reason inside torch's long weights-only message."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", str(err))
    return found.group(1).strip() if found else ""


def _raised_reading(err: BaseException) -> bool:
    import torch

    torch_dir = Path(torch.__file__).resolve().parent
    frames = traceback.extract_tb(err.__traceback__) if err.__traceback__ is not None else []
    return bool(frames) and Path(frames[-1].filename).resolve() in {torch_dir / n for n in _TORCH_READERS}


def damaged_checkpoint(err: BaseException | None) -> BaseException | None:
    """torch's failure to read a damaged or truncated file (anywhere in ``err``'s chain), else None.

    A weights-only refusal counts only when its reason is garbled bytes ("Unsupported operand 76"),
    not a Python object the file really holds (that is :func:`weights_only_refusal`'s case)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, pickle.UnpicklingError) and str(err).startswith(WEIGHTS_ONLY_REFUSAL):
            return err if _refusal_reason(err).startswith(_GARBLED) else None
        zip_error = re.search(r"PytorchStreamReader|zip archive|magic number", str(err))
        unreadable = zip_error or not isinstance(err, RuntimeError)
        if unreadable and isinstance(err, _UNREADABLE) and _raised_reading(err):
            return err
        err = err.__cause__ or err.__context__
    return None


def damage_description(err: BaseException) -> str:
    """What is wrong with the file, in a few words, from torch's error."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError):
        return f"it does not parse as a torch checkpoint: {_refusal_reason(err)}"
    if isinstance(err, EOFError):
        return "it is empty or ends early"
    if isinstance(err, RuntimeError):
        found = re.search(r"failed reading (?:zip archive|file [^:]+): (.+?)(?:\. This is an intern|$)", text)
        return f"it is not a complete zip archive: {found.group(1)}" if found else text.splitlines()[0]
    first = text.splitlines()[0] if text else ""
    return f"it does not parse as a torch checkpoint: {type(err).__name__}: {first}"


def damaged_checkpoint_message(
    subject: str, damage: BaseException, consequence: str = "nothing was loaded"
) -> str:
    """The one line for a checkpoint torch cannot read; ``subject`` names the file."""
    return (f"{subject} is damaged or truncated ({damage_description(damage)}); {consequence}. Use another "
            "checkpoint, e.g. an earlier one of the same run.")


def _damaged_subject(damage: BaseException) -> str:
    path = _SETTINGS.get("ckpt_path")
    if path and _loaded_by_lightning(damage):
        return f"ckpt_path={path!r}"
    return "A file that torch.load read"


# ----- naming the setting ---------------------------------------------------------------------
_SETTINGS: dict[str, str] = {}


def remember_settings(config) -> None:  # noqa: ANN001 - a jsonargparse Namespace
    """Keep the config's path-like string values (``key -> value``) and its ``ckpt_path``, so a
    message that quotes one, e.g. a model directory that does not load, can name the setting it
    came from."""
    subcommand = config.get("subcommand") if hasattr(config, "get") else None
    prefix = f"{subcommand}." if subcommand else ""
    _SETTINGS.clear()
    for key, value in config.items():
        key = key.removeprefix(prefix)
        if isinstance(value, str) and ("/" in value or os.sep in value or key == "ckpt_path"):
            _SETTINGS[key] = value


def settings_quoted_in(message: str) -> list[str]:
    return [k for k, v in _SETTINGS.items() if f"'{v}'" in message or f'"{v}"' in message]


def user_message(err: BaseException) -> str | None:
    """The one line the CLI prints for a user error (prefixed by the setting it names), else None."""
    found = find_user_error(err)
    if found is None:
        damage = damaged_checkpoint(err)
        if damage is not None:
            return damaged_checkpoint_message(_damaged_subject(damage), damage)
        refusal = weights_only_refusal(err)
        return None if refusal is None else unsafe_checkpoint_message(_refused_subject(refusal), refusal)
    if lightning_misconfiguration(found):
        return misconfiguration_message(found)
    message = str(found).strip() or type(found).__name__
    if isinstance(found, (CheckpointError, ExportFailed, CheckpointWriteFailed)):  # names its file
        return message
    keys = settings_quoted_in(message)
    if len(keys) == 1:
        return f"{keys[0]}: {message}"
    if keys:
        return f"{message} (set by {' or '.join(keys)})"
    return message


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def user_errors_exit() -> Iterator[None]:
    """Around the CLI: a user error ends the process with its message and exit code 1, no traceback.
    Under DDP every rank meets the same bad setting, so only rank 0 prints it; the others exit 1
    without a word (one line on the console, not one per rank)."""
    try:
        yield
    except Exception as err:
        message = None if debug_requested() else user_message(err)
        if message is None:
            raise
        if process_rank() == 0:
            sys.stderr.write(f"error: {message}\n{DEBUG_HINT}\n")
        sys.exit(1)


def process_rank() -> int:
    """This process's global rank as Lightning knows it (0 outside distributed runs)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


# ----- jsonargparse's parse errors, condensed -------------------------------------------------
_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes: .*|Errors:|Given value type: .*|"
    r"Given value: .*|Expected a <class 'NoneType'>)$"
)
_KEY = re.compile(r'^Parser key "(.+)":$')
_CLASS = re.compile(r"^Problem with given class_path '(.+)':$")


def condense_parser_message(message: str) -> str:
    """jsonargparse's nested report (Union subtypes, ``Given value: Namespace(...)`` dumps) as one
    line: the full setting, then the first reason given for it."""
    setting, cls, reason = "", None, None
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or _NOISE.match(line):
            continue
        if key := _KEY.match(line):
            joiner = ".init_args." if cls else "."
            setting = f"{setting}{joiner}{key.group(1)}" if setting else key.group(1)
            cls = None
        elif problem := _CLASS.match(line):
            cls = problem.group(1)
        else:
            reason = line
            break
    if reason is None:
        return message.strip().splitlines()[0] if message.strip() else message
    if cls and setting and any(s in reason for s in ("has no attribute", "No module named", "import")):
        return (f"{setting}.class_path={cls!r} cannot be imported ({reason}); check the spelling or the "
                "module path")
    target = f"{setting}.init_args" if cls and setting else setting
    return f"{target}: {reason}" if target else reason
