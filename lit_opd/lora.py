"""LoRA students through peft: only low-rank adapters train, the base weights stay frozen.

Set ``lora`` on the student's :class:`~lit_opd.models.ModelSpec` (YAML:
``student: {path: Qwen/Qwen3-0.6B, lora: {r: 16, alpha: 32}}``). ``load_causal_lm`` then wraps
the model with ``peft.get_peft_model``: every base parameter has ``requires_grad=False``, so
``PolicyModule.configure_optimizers`` (which keeps only parameters that need a gradient) hands
the optimizer the adapters and nothing else. With ``quantization: 4bit`` this is QLoRA: adapters
in full precision on a frozen bitsandbytes base (peft's default keeps adapter weights in fp32
when the base is fp16/bf16). We deliberately do not call ``prepare_model_for_kbit_training``: it
upcasts every non-quantized weight (embeddings included) to fp32, which costs memory and
overrides the spec's dtype.

Checkpoints of a LoRA student hold only the trainable (adapter) tensors, the resolved peft
config and the student spec; resuming rebuilds the base from the spec and loads the adapters
over it, and refuses a different base or different LoRA settings. ``python -m lit_opd export``
rebuilds the base the same way (so the base must be reachable at export time, or passed with
``--base``) and writes either the merged model or, with ``--adapters_only true``, the adapter dir.

G-OPD's reference (``SampledReward(lambda_≠1)``, no ``reference`` given) is a deepcopy of the
student at construction. For a LoRA student that copies the PeftModel, whose fresh ``lora_B``
matrices are zero, so the copy computes exactly the base model: correct, but it holds a second
copy of the base (``reference: <base path>`` gives the same model without the adapter layers).
A forward through the student under ``student.disable_adapter()`` would need no copy at all;
that belongs in ``OPDModule`` and is left to it.

Needs ``pip install 'lit_opd[lora]'``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from lit_opd.errors import MissingExtra, SettingError

INSTALL_HINT = "pip install 'lit_opd[lora]'"
# peft config entries that describe where/when it was saved, not what the adapters compute.
_VOLATILE_KEYS = ("base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping")


@dataclass
class LoraSpec:
    """LoRA settings of a student (peft ``LoraConfig``; defaults follow peft and torchtune).

    Args:
        r: adapter rank.
        alpha: scaling numerator; the update is ``(alpha / r) · B A``.
        dropout: dropout on the adapter input (0 keeps a resumed run bit-exact without RNG state).
        target_modules: "all-linear" (every linear layer except the output head) or module
            names, e.g. ``[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]``.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise SettingError(f"LoraSpec.r={self.r} must be >= 1")
        if self.alpha <= 0:
            raise SettingError(f"LoraSpec.alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise SettingError(f"LoraSpec.dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise SettingError("LoraSpec.target_modules is empty: use 'all-linear' or a list of module names")

    def identity(self) -> dict:
        return asdict(self)

    def to_peft_config(self):  # noqa: ANN201 - peft.LoraConfig is an optional import
        peft = require_peft()
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return peft.LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
            bias="none", task_type="CAUSAL_LM",
        )


# bitsandbytes' CPU backend logs this on import when an optional 4-bit kernel is missing; peft imports
# bitsandbytes whenever it is installed, so every LoRA run printed it though nothing is quantized. A
# quantized model imports bitsandbytes itself first (lit_opd.models), so its runs still get the hint.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_CPU_HINT = "Failed to load CPU gemm_4bit_forward"


def _not_bnb_cpu_hint(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BNB_CPU_HINT)


@contextlib.contextmanager
def quiet_bnb_cpu_hint() -> Iterator[None]:
    """Drop bitsandbytes' missing-CPU-kernel warning (only that message) while the block runs."""
    bnb_logger = logging.getLogger(_BNB_CPU_LOGGER)
    bnb_logger.addFilter(_not_bnb_cpu_hint)
    try:
        yield
    finally:
        bnb_logger.removeFilter(_not_bnb_cpu_hint)


def require_peft():  # noqa: ANN201 - the peft module
    try:
        with quiet_bnb_cpu_hint():
            import peft
    except ImportError as err:
        raise MissingExtra(f"A LoRA student (ModelSpec.lora) needs peft: {INSTALL_HINT}") from err
    return peft


def is_peft_model(model: nn.Module) -> bool:
    """True for a peft ``PeftModel`` (without importing peft when nothing has)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def apply_lora(model: nn.Module, spec: LoraSpec, revision: str | None = None) -> nn.Module:
    """Wrap ``model`` (modified in place) with fresh adapters; base parameters are frozen."""
    peft = require_peft()
    return peft.get_peft_model(model, spec.to_peft_config(), revision=revision)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (adapters stay in place and active), else ``model``.

    The sampler inspects ``forward``'s signature (``cache`` vs ``past_key_values``); the PeftModel's
    ``**kwargs`` forward hides it, the inner model's does not.
    """
    return model.get_base_model() if is_peft_model(model) else model


def trainable_keys(model: nn.Module, prefix: str = "") -> set[str]:
    """State-dict keys of the parameters that train (for a LoRA student: the adapters)."""
    return {prefix + name for name, param in model.named_parameters() if param.requires_grad}


# ----- what a checkpoint records ---------------------------------------------------------------
def _plain(value: Any) -> Any:  # noqa: ANN401 - any peft config value
    """JSON-like plain data (sets sorted, enums by value) so checkpoints load with weights_only."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def peft_record(model: nn.Module) -> dict:
    """The adapter name and its resolved peft config: enough to rebuild the adapters on a base."""
    name = model.active_adapter
    return {"adapter_name": name, "config": _plain(model.peft_config[name].to_dict())}


def _settings(record: dict) -> dict:
    return {k: v for k, v in record["config"].items() if k not in _VOLATILE_KEYS}


def check_resume(saved: dict, current: dict | None, student_spec: dict | None) -> None:
    """Raise unless a LoRA checkpoint's adapters fit the student being resumed.

    ``saved`` is the checkpoint's ``lit_opd`` entry; ``current`` the running student's
    :func:`peft_record` (None: not a PEFT model); ``student_spec`` its spec identity.
    """
    before = saved.get("peft")
    if before is None and current is None:
        return
    if before is None:
        raise SettingError(
            "This checkpoint holds a full (non-LoRA) student but the configured student has LoRA "
            "adapters. Export the checkpoint and use the exported directory as the LoRA base instead."
        )
    old = _settings(before)
    if current is None:
        summary = {k: old.get(k) for k in ("r", "lora_alpha", "lora_dropout")}
        raise SettingError(
            f"This checkpoint holds only LoRA adapters ({summary}); configure the student with the "
            "same `lora:` settings and base to resume it."
        )
    new = _settings(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        # peft's names (lora_alpha) as the user writes them under `lora:` (alpha).
        differences = ", ".join(
            f"{k.removeprefix('lora_')}: checkpoint {old.get(k)!r}, configured {new.get(k)!r}"
            for k in changed
        )
        raise SettingError(
            f"The LoRA settings differ from the checkpoint's ({differences}); nothing was loaded. Resume "
            "with the checkpoint's values under model.init_args.student.lora, or start a new run without "
            "--ckpt_path."
        )
    old_spec = saved.get("student_spec") or {}
    for key in ("path", "revision"):
        if student_spec is not None and key in old_spec and old_spec[key] != student_spec.get(key):
            raise SettingError(
                f"This LoRA checkpoint was trained on base {key}={old_spec[key]!r}, but the student's base "
                f"is {key}={student_spec.get(key)!r}. Adapters only fit the base they were trained on."
            )


def check_adapter_keys(saved: set[str], expected: set[str]) -> None:
    """A LoRA checkpoint must hold exactly the adapter tensors of the student it resumes."""
    if saved != expected:
        raise SettingError(
            "The checkpoint's adapter tensors do not match the student's: "
            f"missing {sorted(expected - saved)[:5]}, unexpected {sorted(saved - expected)[:5]}"
        )


def rebuild(record: dict, base: nn.Module, adapter_state: dict) -> nn.Module:
    """``base`` with the recorded adapters, their weights loaded from ``adapter_state``.

    ``adapter_state`` uses the PeftModel's own state-dict keys (``base_model.model.…``).
    """
    peft = require_peft()
    config = peft.PeftConfig.from_peft_type(**_settings(record))
    model = peft.get_peft_model(base, config, adapter_name=record["adapter_name"])
    _, unexpected = model.load_state_dict(adapter_state, strict=False)
    absent = sorted(trainable_keys(model) - set(adapter_state))
    if unexpected or absent:
        raise SettingError(
            f"The checkpoint's adapters do not fit the base: unexpected {unexpected[:5]}, "
            f"missing {absent[:5]}"
        )
    return model
