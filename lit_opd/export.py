"""Write a checkpoint's student (and tokenizer) as a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def export_checkpoint(ckpt_path: str, out: str, overwrite: bool = False) -> Path:
    """Load ``ckpt_path`` and ``save_pretrained`` its student into ``out``; returns ``out``.

    Refuses to write into a non-empty directory unless ``overwrite`` so nothing the user had is lost.
    """
    ckpt_file, out_dir = Path(ckpt_path), Path(out)
    if not ckpt_file.is_file():
        raise FileNotFoundError(f"export --ckpt_path {ckpt_path!r} does not exist")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"export --out {out!r} is not empty; choose a new directory or pass --overwrite true")
    checkpoint = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    info = checkpoint.get("lit_opd")
    if not info or not info.get("student_config"):
        raise ValueError(f"{ckpt_path} is not a lit_opd checkpoint of a transformers student (no student config)")
    config_dict = dict(info["student_config"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = AutoModelForCausalLM.from_config(config)
    state = {k.removeprefix("student."): v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the student architecture: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for name, data in info.get("tokenizer_files", {}).items():
        (out_dir / name).write_bytes(data)
    return out_dir


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """Output-layer weights tied to the input embeddings are not stored separately."""
    if getattr(model.config, "tie_word_embeddings", False):
        return {"lm_head.weight"}
    return set()
