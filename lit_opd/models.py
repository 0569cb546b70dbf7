"""Load students, teachers and references from a spec, and check that they can talk to each other.

A spec names a local directory or hub id plus how to load it (revision, dtype, attention
implementation, bitsandbytes quantization, LoRA). Anything that is already an ``nn.Module``
passes through unchanged, so Python users can hand in models they built themselves.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from lit_opd.errors import MissingExtra, SettingError, UnusablePath
from lit_opd.lora import LoraSpec, apply_lora, require_peft
from lit_opd.types import RolloutBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """Where a causal LM comes from and how to load it.

    Args:
        path: local directory (``save_pretrained`` layout) or hub id.
        revision: hub revision (branch, tag or commit); recorded in checkpoints.
        dtype: "float32", "bfloat16", "float16" or "auto" (the checkpoint's own dtype).
        attn_implementation: e.g. "sdpa", "eager", "flash_attention_2"; None = transformers' default.
        quantization: None, "8bit" or "4bit" (bitsandbytes; needs ``pip install lit_opd[quant]``).
        trust_remote_code: run code shipped with the checkpoint (off unless you trust it).
        tokenizer: tokenizer path when it differs from ``path``.
        random_init: build the architecture in ``path``'s config.json with fresh random weights
            (train a model from scratch, e.g. the quickstart's teacher).
        lora: train LoRA adapters on the frozen model instead of all its weights (:class:`LoraSpec`,
            needs ``pip install 'lit_opd[lora]'``); with ``quantization`` this is QLoRA. Meant for
            students; see :mod:`lit_opd.lora`.
    """

    path: str
    revision: str | None = None
    dtype: str = "float32"
    attn_implementation: str | None = None
    quantization: Literal["8bit", "4bit"] | None = None
    trust_remote_code: bool = False
    tokenizer: str | None = None
    random_init: bool = False
    lora: LoraSpec | None = None

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise SettingError(f"ModelSpec.dtype={self.dtype!r} is not one of {sorted(DTYPES) + ['auto']}")
        if self.quantization not in (None, "8bit", "4bit"):
            raise SettingError(f"ModelSpec.quantization={self.quantization!r}: use null, '8bit' or '4bit'")
        if self.lora is not None and self.random_init:
            raise SettingError("ModelSpec.lora needs pretrained base weights; it cannot go with random_init")

    def identity(self) -> dict:
        """What a checkpoint records to recognise this model again on resume."""
        ident = asdict(self)
        if ident["lora"] is None:  # identities recorded before the field existed stay equal
            del ident["lora"]
        return ident


def as_spec(model: ModelSpec | str) -> ModelSpec:
    return ModelSpec(path=model) if isinstance(model, str) else model


def _quantization_config(spec: ModelSpec):  # noqa: ANN202 - BitsAndBytesConfig is an optional import
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError as err:
        raise MissingExtra(
            f"ModelSpec.quantization={spec.quantization!r} needs bitsandbytes and accelerate: "
            "pip install 'lit_opd[quant]'"
        ) from err
    compute_dtype = DTYPES.get(spec.dtype, torch.bfloat16)
    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )


def load_causal_lm(model: ModelSpec | str | nn.Module) -> nn.Module:
    """Build the model a spec describes; an ``nn.Module`` is returned as is."""
    if isinstance(model, nn.Module):
        return model
    spec = as_spec(model)
    if spec.lora is not None:
        require_peft()  # fail before loading the base
    kwargs: dict = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    kwargs["dtype"] = "auto" if spec.dtype == "auto" else DTYPES[spec.dtype]
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.quantization:
        kwargs["quantization_config"] = _quantization_config(spec)
        kwargs["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    try:
        if spec.random_init:
            config = AutoConfig.from_pretrained(spec.path, **{k: kwargs[k] for k in ("revision", "trust_remote_code")})
            return AutoModelForCausalLM.from_config(config, dtype=kwargs["dtype"] if spec.dtype != "auto" else None)
        model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    except ValueError as err:
        refuse_remote_code(spec.path, err)
        raise
    except OSError as err:
        raise UnusablePath(
            f"Could not load model {spec.path!r}: {_load_failure(spec.path, err)}. Point `path` at a "
            "local directory written by `save_pretrained` (or by `python -m lit_opd export`), or at a hub "
            "id you can reach."
        ) from err
    return apply_lora(model, spec.lora, spec.revision) if spec.lora is not None else model


def load_tokenizer(
    tokenizer: str | PreTrainedTokenizerBase | None, model: ModelSpec | str | nn.Module
) -> PreTrainedTokenizerBase:
    """The tokenizer given, else the one stored next to the model spec."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if tokenizer is None:
        if isinstance(model, nn.Module):
            raise SettingError("A model passed as an nn.Module needs `tokenizer=` (a path or a tokenizer object)")
        spec = as_spec(model)
        tokenizer = spec.tokenizer or spec.path
        kwargs = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    else:
        kwargs = {}
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer, **kwargs)
    except ValueError as err:
        refuse_remote_code(tokenizer, err)
        raise
    except OSError as err:
        raise UnusablePath(
            f"Could not load a tokenizer from {tokenizer!r}: {_load_failure(tokenizer, err)}. Point "
            "`tokenizer` (or the model path) at a directory holding tokenizer files, or at a hub id you "
            "can reach."
        ) from err
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        # Padding is masked everywhere; EOS is the conventional stand-in.
        tok.pad_token = tok.eos_token
    return tok


def refuse_remote_code(path: str, err: ValueError) -> None:
    """transformers' refusal to run the Python code a checkpoint ships (its ``auto_map``) without
    ``trust_remote_code``, as one line that says how to allow it; other errors pass through."""
    if "trust_remote_code" not in str(err) and "custom code" not in str(err):
        return
    raise SettingError(
        f"Model {path!r} ships its own Python code (an auto_map in its config), which is not run unless you "
        "allow it; if you trust where it comes from, give the model as a spec with trust_remote_code: true "
        "(e.g. student: {path: ..., trust_remote_code: true}), or use a model transformers supports natively"
    ) from err


def _load_failure(path: str, err: Exception) -> str:
    """Why ``path`` did not load, in words: a local-looking path that is not there says so instead of
    the hub's complaint about repo ids."""
    local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1
    if local and not os.path.exists(os.path.expanduser(path)):
        return "no such directory"
    return str(err).strip().rstrip(".")


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a sharded (FSDP2 / tensor-parallel) parameter or tensor."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor) or isinstance(getattr(tensor, "data", None), DTensor)


# Config attributes that make logits differ from lm_head(hidden).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def plain_head(model: nn.Module) -> bool:
    """True when ``model``'s logits are its output layer applied to its decoder's last hidden state."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config is None or not isinstance(head, nn.Linear) or not hasattr(model, "get_decoder"):
        return False
    if not head.weight.dtype.is_floating_point or head.weight.dim() != 2:  # e.g. a packed 4-bit head
        return False
    if is_dtensor(head.weight):  # FSDP2 shards it outside forward: use the logits path
        return False
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


def completion_hidden(model: nn.Module, batch: RolloutBatch) -> Tensor:
    """Last hidden states at the positions that predict each completion token: (B, T, H)."""
    T = batch.completion_ids_BT.shape[1]
    out = model.get_decoder()(
        input_ids=batch.input_ids_BL,
        attention_mask=batch.attention_mask_BL,
        position_ids=batch.position_ids_BL,
        use_cache=False,
    )
    return out.last_hidden_state[:, -T - 1 : -1, :]


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the state a teacher or reference lives in."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def check_tokenizers_compatible(
    student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase, teacher_name: str = "teacher"
) -> None:
    """Raise unless both map every token to the same id and agree on EOS and pad.

    Token-level losses compare distributions id by id, so a single shifted id silently corrupts them.
    """
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        moved = sorted(k for k in set(s_vocab) & set(t_vocab) if s_vocab[k] != t_vocab[k])[:5]
        raise SettingError(
            f"Student and {teacher_name} tokenizers differ (student {len(s_vocab)} tokens, "
            f"{teacher_name} {len(t_vocab)}): only in student {only_s}, only in {teacher_name} {only_t}, "
            f"different ids {moved}. Token-level distillation needs the same token→id map; use a "
            f"{teacher_name} from the same model family or a text-only method."
        )
    for name in ("eos_token_id", "pad_token_id"):
        s_id, t_id = getattr(student_tok, name), getattr(teacher_tok, name)
        if s_id != t_id:
            raise SettingError(
                f"Student and {teacher_name} disagree on {name}: student {s_id}, {teacher_name} {t_id}. "
                "Set the same special tokens on both tokenizers."
            )


def check_model_vocab(model: nn.Module, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """The model's output layer must cover every token id the tokenizer can produce."""
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and emb.weight.shape[0] < len(tokenizer):
        raise SettingError(
            f"The {name} model has {emb.weight.shape[0]} output rows but its tokenizer has "
            f"{len(tokenizer)} tokens; resize the model's embeddings or use its own tokenizer."
        )


def completion_logits(model: nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """Logits that predict each completion token: (B, T, V).

    Only the last T+1 positions go through the output layer (``logits_to_keep``), so the prompt
    never costs a [P, V] projection.
    """
    T = batch.completion_ids_BT.shape[1]
    out = model(
        input_ids=batch.input_ids_BL,
        attention_mask=batch.attention_mask_BL,
        position_ids=batch.position_ids_BL,
        logits_to_keep=T + 1,
        use_cache=False,
    )
    return out.logits[:, :-1, :]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) tensor; the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def any_nonfinite(tensors: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """A 0-d bool tensor on the device, True when any element is NaN/inf; None for no tensors."""
    flags = [torch.isfinite(local_tensor(t).detach()).all() for t in tensors if t.is_floating_point()]
    if not flags:
        return None
    device = flags[0].device
    return ~torch.stack([f.to(device) for f in flags]).all()


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN/inf, else None."""
    named = [(n, t) for n, t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]
    bad = any_nonfinite(t for _, t in named)
    if bad is None or not bool(bad):
        return None
    return next((n for n, t in named if not bool(torch.isfinite(local_tensor(t)).all())), None)
