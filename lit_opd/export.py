"""Write a checkpoint's student (and tokenizer) as a Hugging Face model directory.

A full student is rebuilt from the HF config stored in the checkpoint. A LoRA student's checkpoint
holds only the adapters, so its base is loaded again from the recorded student spec (path and
revision; unquantized, in the spec's dtype) or from ``base``: the base must be reachable at export
time. By default the adapters are merged into it (``merge_and_unload``) and a plain transformers
model is written; ``adapters_only`` writes the peft adapter directory instead
(``PeftModel.from_pretrained(base, out)`` loads it). A QLoRA student is merged into the
unquantized base, so the merged model differs from the trained one by the quantization error.

The checkpoint is read with ``torch.load(..., weights_only=True)``: lit_opd writes only tensors and
plain data, and a file that holds other pickled Python objects (which could run code when loaded)
is refused with :class:`~lit_opd.errors.UnsafeCheckpoint` before anything in it runs or is written.
A damaged file, or one whose student tensors differ from the checksums recorded at save
(:mod:`lit_opd.checkpoints`), is refused with :class:`~lit_opd.errors.CheckpointError`.

The export is written to a hidden folder beside ``out`` and moved into place only once complete:
``out`` then holds exactly the new export (``--overwrite`` replaces its old contents, so no stale
shard or index of an earlier export survives). If writing fails (a full disk, a crash), ``out`` is
left as it was and no partial export remains.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lit_opd.checkpoints import read_checkpoint, verify_checksums
from lit_opd.errors import ExportFailed, MissingFile, SettingError, UnusablePath

# Config entries that must agree between a LoRA checkpoint's student and the base it is put on.
_ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")


def export_checkpoint(
    ckpt_path: str, out: str, overwrite: bool = False, adapters_only: bool = False, base: str | None = None
) -> Path:
    """Load ``ckpt_path`` and ``save_pretrained`` its student into ``out``; returns ``out``.

    Refuses a non-empty directory unless ``overwrite`` (then its old contents are replaced once the
    new export is complete; a folder holding subfolders or the checkpoint itself is still refused)
    so nothing the user had is lost by mistake. ``adapters_only`` and
    ``base`` apply to LoRA checkpoints only (see the module docstring).
    """
    ckpt_file, out_dir = Path(ckpt_path), Path(out)
    out_dir = out_dir.resolve() if out_dir.is_symlink() else out_dir  # replace the target, keep the link
    if not ckpt_file.is_file():
        raise MissingFile(f"export --ckpt_path {ckpt_path!r} does not exist")
    if out_dir.exists() and not out_dir.is_dir():
        raise UnusablePath(f"export --out {out!r} is a file; choose a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise UnusablePath(
                f"export --out {out!r} is not empty; choose a new directory or pass --overwrite true"
            )
        _check_replaceable(out_dir, ckpt_file, out)
    subject = f"export --ckpt_path {ckpt_path!r}"
    checkpoint = read_checkpoint(ckpt_file, subject, "nothing was written")
    info = checkpoint.get("lit_opd")
    if not info or not info.get("student_config"):
        raise SettingError(f"{ckpt_path} is not a lit_opd checkpoint of a transformers student (no student config)")
    verify_checksums(info, checkpoint["state_dict"], subject, "nothing was written")
    state = {k.removeprefix("student."): v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
    if info.get("peft") is not None:
        model = _lora_student(info, state, base)
        if not adapters_only:
            model = model.merge_and_unload()
    elif adapters_only or base is not None:
        raise SettingError(f"{ckpt_path} holds a full student, not LoRA adapters: drop --adapters_only/--base")
    else:
        model = _full_student(info, state)
    with _written_in_place_of(out_dir, out) as staging:
        model.save_pretrained(staging)
        for name, data in info.get("tokenizer_files", {}).items():
            (staging / name).write_bytes(data)
    return out_dir


def _check_replaceable(out_dir: Path, ckpt_file: Path, out: str) -> None:
    """``--overwrite`` replaces ``out_dir`` as a whole: refuse when that would delete more than an
    earlier export (which is files only) — a folder inside it, or the checkpoint being exported."""
    folders = sorted(p.name for p in out_dir.iterdir() if p.is_dir())
    if folders:
        raise UnusablePath(f"export --out {out!r} holds folders ({folders[0]!r}), which --overwrite would "
                              "delete with the rest of it (an export is files only); choose a new directory")
    if ckpt_file.resolve().parent == out_dir.resolve():
        raise UnusablePath(f"export --out {out!r} holds the checkpoint being exported, which --overwrite "
                              "would delete; choose a new directory")


@contextlib.contextmanager
def _written_in_place_of(out_dir: Path, out: str) -> Iterator[Path]:
    """A new folder beside ``out_dir`` to write the export into; once the block completes it takes
    ``out_dir``'s place (the old one is removed after). If the block fails, it is removed and
    ``out_dir`` is left untouched; a write error (full disk, ...) becomes :class:`ExportFailed`."""
    created = [p for p in [out_dir.parent, *out_dir.parent.parents] if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f".{out_dir.name}.{secrets.token_hex(4)}"
    staging, old = out_dir.with_name(f"{tag}.partial"), out_dir.with_name(f"{tag}.old")
    staging.mkdir()  # made with the user's umask, like out_dir would be
    try:
        yield staging
        if out_dir.exists():
            out_dir.rename(old)
        try:
            staging.rename(out_dir)
        except BaseException:
            if old.exists():
                old.rename(out_dir)
            raise
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # innermost first: only folders this export made, if still empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        if _write_error(err):
            raise ExportFailed(f"export --out {out!r}: writing the export failed ({_reason(err)}); --out was "
                               "left as it was and no partial export remains.") from err
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_error(err: BaseException) -> bool:
    """An OSError, or safetensors' error for a failed write (it is not an OSError)."""
    return isinstance(err, OSError) or (type(err).__name__ == "SafetensorError" and "IoError" in str(err))


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    found = re.search(r'message: "([^"]+)"', str(err))  # safetensors: IoError(Os { ..., message: "..." })
    return found.group(1) if found else (str(err).splitlines() or [type(err).__name__])[0]


def _full_student(info: dict, state: dict) -> torch.nn.Module:
    config_dict = dict(info["student_config"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise SettingError(f"checkpoint does not match the student architecture: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model


def _lora_student(info: dict, adapter_state: dict, base: str | None) -> torch.nn.Module:
    """The PeftModel of a LoRA checkpoint: its base loaded again, the saved adapters on top."""
    from lit_opd.lora import rebuild
    from lit_opd.models import ModelSpec, load_causal_lm

    spec = dict(info.get("student_spec") or {})
    if base is None and not spec.get("path"):
        raise SettingError("This LoRA checkpoint records no base model path (the student was an nn.Module); "
                         "pass --base with the directory or hub id of its base model")
    spec.update(lora=None, quantization=None, random_init=False)  # merge into full-precision weights
    if base is not None:
        spec.update(path=base, revision=None)
    base_model = load_causal_lm(ModelSpec(**spec))
    saved, found = info["student_config"], base_model.config.to_dict()
    differ = [k for k in _ARCH_KEYS if k in saved and saved[k] != found.get(k)]
    if differ:
        raise SettingError(f"The base at {spec['path']!r} is not the model these adapters were trained on: "
                         f"{', '.join(f'{k} {found.get(k)} != {saved[k]}' for k in differ)}")
    return rebuild(info["peft"], base_model, adapter_state)


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """Output-layer weights tied to the input embeddings are not stored separately."""
    if getattr(model.config, "tie_word_embeddings", False):
        return {"lm_head.weight"}
    return set()
