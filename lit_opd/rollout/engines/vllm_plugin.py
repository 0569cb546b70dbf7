"""lit_opd's weight-transfer backends for vLLM, registered through vLLM's own extension points.

vLLM receives trainer weights through a ``WeightTransferEngine`` chosen by
``weight_transfer_config.backend`` and driven by its RL routes (``init_weight_transfer_engine``,
``start_weight_update``, ``update_weights``, ``finish_weight_update``: ``LLM`` methods in process,
HTTP routes on ``vllm serve`` with ``VLLM_SERVER_DEV_MODE=1``). Its built-in backends move tensors
between GPUs (``nccl``, CUDA ``ipc``); these two cover what they cannot:

* ``lit_opd_local``: the trainer and vLLM share one process (``VLLMEngine``, colocated; vLLM's
  engine core in process), so an update carries the tensors themselves — no copy through a
  transport, on any device.
* ``lit_opd_files``: the trainer writes ``model.safetensors`` into a directory the server can read
  and the update names the file (``VLLMServerEngine`` on CPU, where no NCCL exists).

Both load through the model's own ``load_weights`` (Hugging Face names; vLLM fuses q/k/v and
gate/up itself) inside vLLM's layerwise reload, as its IPC backend does, so fused layouts and
post-load processing are redone exactly. :func:`register` is the ``vllm.general_plugins`` entry
point (``pyproject.toml``): vLLM calls it in every process it starts, a server's workers included.
This module imports vLLM: only vLLM processes and the vLLM engines import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

LOCAL_BACKEND = "lit_opd_local"
FILES_BACKEND = "lit_opd_files"


def register() -> None:
    """Add lit_opd's backends to vLLM's weight-transfer registry (idempotent)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    for name, cls_name in ((LOCAL_BACKEND, "LocalWeightTransfer"), (FILES_BACKEND, "FileWeightTransfer")):
        if name not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(name, __name__, cls_name)


@dataclass
class NoInitInfo(WeightTransferInitInfo):
    """Neither backend needs a rendezvous."""


@dataclass
class TensorUpdate(WeightTransferUpdateInfo):
    """``weights``: (Hugging Face name, tensor) pairs, handed over in process."""

    weights: list[tuple[str, torch.Tensor]] = field(default_factory=list)


@dataclass
class FileUpdate(WeightTransferUpdateInfo):
    """``path``: a safetensors file of (Hugging Face name → tensor) the server can read."""

    path: str = ""


class _LayerwiseReload(WeightTransferEngine):
    """Shared lifecycle: vLLM's layerwise reload around the loads, as its IPC backend does."""

    init_info_cls = NoInitInfo

    def init_transfer_engine(self, init_info: Any) -> None:
        pass

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        pass

    def _load(self, weights) -> None:  # noqa: ANN001 - an iterable of (name, tensor)
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        with disable_mtp_completeness_check():
            self.model.load_weights(weights)


class LocalWeightTransfer(_LayerwiseReload):
    update_info_cls = TensorUpdate

    def receive_weights(self, update_info: TensorUpdate) -> None:
        self._load((name, tensor.to(self.device)) for name, tensor in update_info.weights)


class FileWeightTransfer(_LayerwiseReload):
    update_info_cls = FileUpdate

    def receive_weights(self, update_info: FileUpdate) -> None:
        from safetensors.torch import load_file

        self._load(load_file(update_info.path, device=str(self.device)).items())
