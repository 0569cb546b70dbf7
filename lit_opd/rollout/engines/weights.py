"""The student's current weights as whole tensors under Hugging Face names: what an inference
engine loads. A LoRA student is merged on the fly (base + peft's own delta, the training weights
untouched); FSDP2 shards are gathered (``DTensor.full_tensor``, a collective every rank joins);
FSDP (v1) parameters are whole inside ``summon_full_params``, which the rollout already holds.
Handed to vLLM as a ``WeightSource`` (:class:`StudentWeights`) or one safetensors file (:func:`save_weights`)."""

from __future__ import annotations

import os
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


class StudentWeights:
    """The student's weights as a vLLM ``WeightSource`` (``metadata()``, a fresh pass per ``iter``),
    what the NCCL trainer engine broadcasts. Names, dtypes and shapes are read once."""

    def __init__(self, policy: nn.Module) -> None:
        self.policy, self._meta = policy, None

    def metadata(self) -> list:
        from vllm.distributed.weight_transfer.base import ParamMeta

        if self._meta is None:
            self._meta = [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in hf_weights(self.policy)]
        return list(self._meta)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return hf_weights(self.policy)


def save_weights(policy: nn.Module, path: str) -> None:
    """``policy``'s weights (:func:`hf_weights`) as one safetensors file at ``path``, atomically (a
    reader sees the old file or the new one); tensors that share storage (tied embeddings) apart."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in hf_weights(policy):
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    partial = f"{path}.{os.getpid()}.partial"
    save_file(tensors, partial)
    os.replace(partial, path)
