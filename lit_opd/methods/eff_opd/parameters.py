"""Which parameters EffOPD moves (attention and MLP blocks of the student) and the tensors it reads
and writes in place: each rank's own shard of a sharded parameter."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lit_opd.methods.base import PolicyModule

#: Substrings (matched in the lower-cased parameter name) of the parameters EffOPD moves: attention
#: and MLP blocks; embeddings, norms outside them and the LM head stay put (README.md, "The line search").
DEFAULT_MODULES: tuple[str, ...] = (
    "attn", "self_attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj",
    "mlp", "feed_forward", "ffn", "gate_proj", "up_proj", "down_proj",
)


def select_parameters(
    model: nn.Module, include: Sequence[str] = DEFAULT_MODULES
) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters whose lower-cased name contains one of ``include``."""
    keys = [k.lower() for k in include]
    return [
        (n, p) for n, p in model.named_parameters() if p.requires_grad and any(k in n.lower() for k in keys)
    ]


def cpu_copy(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A CPU copy of each tensor (what a checkpoint stores of the anchor)."""
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


def local_tensor(param: Tensor) -> Tensor:
    """The tensor this rank holds: the parameter's data, or its local shard for a ``DTensor``."""
    data = param.data
    return data.to_local() if isinstance(data, DTensor) else data


def policy_of(pl_module: L.LightningModule) -> nn.Module:
    """The student: ``pl_module.policy`` for a lit_opd method, else the module itself (a plain
    LightningModule is its own model)."""
    return pl_module.policy if isinstance(pl_module, PolicyModule) else pl_module
