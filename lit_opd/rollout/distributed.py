"""Where the rollout runs among several processes: which strategies shard the student (so every
decode step is a collective and ranks must stop together), and the context a generation needs
(the trainer's precision; FSDP v1's parameters gathered)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable


def is_sharded(trainer) -> bool:  # noqa: ANN001
    """FSDP or FSDP2 over several ranks: the student's weights are split across processes."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return trainer.world_size > 1 and isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))


def ranks_agree(trainer) -> Callable[[bool], bool] | None:  # noqa: ANN001
    """With a sharded student every decode step is a collective, so ranks stop together."""
    if trainer is None or not is_sharded(trainer):
        return None
    return lambda done: trainer.strategy.reduce_boolean_decision(done, all=True)


def generation_context(trainer) -> contextlib.AbstractContextManager:  # noqa: ANN001
    """The rollout runs under the trainer's precision (bf16-mixed: autocast), as the training
    forward does, so the sampler's log-probs come from the same arithmetic. FSDP (v1) also keeps
    parameters flat and sharded outside its own forward, so calling the student directly to
    generate needs them gathered first (the problem behind TRL issue 2580); FSDP2 (``fully_shard``,
    ModelParallelStrategy) gathers per layer in the student's own forward."""
    from lightning.pytorch.strategies import FSDPStrategy

    stack = contextlib.ExitStack()
    if trainer is None:
        return stack
    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        stack.enter_context(
            FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False, recurse=True)
        )
    stack.enter_context(trainer.precision_plugin.forward_context())
    return stack
