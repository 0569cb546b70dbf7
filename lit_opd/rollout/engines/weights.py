"""The student's current weights as whole tensors under Hugging Face names: what an inference
engine loads. A LoRA student is merged on the fly (base + peft's own delta, the training weights
untouched); FSDP2 shards are gathered (``DTensor.full_tensor``, a collective every rank joins);
FSDP (v1) parameters are whole inside ``summon_full_params``, which the rollout already holds."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lit_opd.models import is_dtensor


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers by module name (empty for a plain model)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


@torch.no_grad()
def hf_weights(policy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter and persistent buffer of ``policy`` (the transformers model,
    for a LoRA student the one inside the PeftModel), LoRA deltas merged into their base weights."""
    lora = _lora_layers(policy)
    skip = tuple(f"{name}." for name in lora)
    for name, tensor in policy.state_dict(keep_vars=False).items():
        if not name.startswith(skip):
            yield name, _whole(tensor)
    for name, layer in lora.items():
        weight = _whole(layer.base_layer.weight)
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        yield f"{name}.weight", weight
        if getattr(layer.base_layer, "bias", None) is not None:
            yield f"{name}.bias", _whole(layer.base_layer.bias)
