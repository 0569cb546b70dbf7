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
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lit_opd.errors import UnsafeCheckpoint, unsafe_checkpoint_message, weights_only_refusal

# Config entries that must agree between a LoRA checkpoint's student and the base it is put on.
_ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")


def export_checkpoint(
    ckpt_path: str, out: str, overwrite: bool = False, adapters_only: bool = False, base: str | None = None
) -> Path:
    """Load ``ckpt_path`` and ``save_pretrained`` its student into ``out``; returns ``out``.

    Refuses to write into a non-empty directory unless ``overwrite`` so nothing the user had is lost.
    ``adapters_only`` and ``base`` apply to LoRA checkpoints only (see the module docstring).
    """
    ckpt_file, out_dir = Path(ckpt_path), Path(out)
    if not ckpt_file.is_file():
        raise FileNotFoundError(f"export --ckpt_path {ckpt_path!r} does not exist")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"export --out {out!r} is not empty; choose a new directory or pass --overwrite true")
    try:
        checkpoint = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if weights_only_refusal(err) is None:
            raise
        raise UnsafeCheckpoint(unsafe_checkpoint_message(f"export --ckpt_path {ckpt_path!r}", err)) from err
    info = checkpoint.get("lit_opd")
    if not info or not info.get("student_config"):
        raise ValueError(f"{ckpt_path} is not a lit_opd checkpoint of a transformers student (no student config)")
    state = {k.removeprefix("student."): v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
    if info.get("peft") is not None:
        model = _lora_student(info, state, base)
        if not adapters_only:
            model = model.merge_and_unload()
    elif adapters_only or base is not None:
        raise ValueError(f"{ckpt_path} holds a full student, not LoRA adapters: drop --adapters_only/--base")
    else:
        model = _full_student(info, state)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for name, data in info.get("tokenizer_files", {}).items():
        (out_dir / name).write_bytes(data)
    return out_dir


def _full_student(info: dict, state: dict) -> torch.nn.Module:
    config_dict = dict(info["student_config"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the student architecture: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model


def _lora_student(info: dict, adapter_state: dict, base: str | None) -> torch.nn.Module:
    """The PeftModel of a LoRA checkpoint: its base loaded again, the saved adapters on top."""
    from lit_opd.lora import rebuild
    from lit_opd.models import ModelSpec, load_causal_lm

    spec = dict(info.get("student_spec") or {})
    if base is None and not spec.get("path"):
        raise ValueError("This LoRA checkpoint records no base model path (the student was an nn.Module); "
                         "pass --base with the directory or hub id of its base model")
    spec.update(lora=None, quantization=None, random_init=False)  # merge into full-precision weights
    if base is not None:
        spec.update(path=base, revision=None)
    base_model = load_causal_lm(ModelSpec(**spec))
    saved, found = info["student_config"], base_model.config.to_dict()
    differ = [k for k in _ARCH_KEYS if k in saved and saved[k] != found.get(k)]
    if differ:
        raise ValueError(f"The base at {spec['path']!r} is not the model these adapters were trained on: "
                         f"{', '.join(f'{k} {found.get(k)} != {saved[k]}' for k in differ)}")
    return rebuild(info["peft"], base_model, adapter_state)


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """Output-layer weights tied to the input embeddings are not stored separately."""
    if getattr(model.config, "tie_word_embeddings", False):
        return {"lm_head.weight"}
    return set()
