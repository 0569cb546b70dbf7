"""The rollout engine: the one component that turns prompts into the student's completions.

The :class:`~lit_opd.rollout.RolloutDataModule` holds one engine (``engine:`` in YAML) and every
generation from the student goes through it — training rollouts, greedy validation, EffOPD's
held-out rollouts, OmniOPD's candidates, OPAD's episode turns — so switching the engine switches
them all. An engine gets the live student and a *weights version* with each call; the version
changes once per optimizer step (and when a callback rewrites the weights), so an engine that
keeps its own copy of the weights (vLLM) syncs exactly when the version moved and never otherwise.

:class:`BuiltinEngine` (the default) samples with the student itself: the KV-cached loop of
``rollout/sampling.py`` with the lean decode step and, on a GPU, its CUDA graph. Nothing to
install, any device, any model transformers runs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import nn

from lit_opd.rollout.sampling import SampleOutput, sample
from lit_opd.types import SamplingParams


class RolloutEngine:
    """Where the student's completions come from. Subclass and implement :meth:`generate`.

    Engines are built from YAML (``class_path`` + ``init_args``) and attached to the datamodule;
    :meth:`setup` runs once the student, tokenizer and trainer are known, :meth:`close` when the
    datamodule is torn down.
    """

    #: times the engine loaded the student's weights (0 for an engine that samples with the student).
    syncs: int = 0
    #: (student object, weights version) of the last sync; None before the first.
    synced_version: Hashable = None

    def sync(self, policy: nn.Module, weights_version: Hashable = None) -> None:
        """Load ``policy``'s current weights (engines that keep their own copy of them)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no copy of the weights to sync")

    def sync_if_stale(self, policy: nn.Module, weights_version: Hashable) -> None:
        """:meth:`sync` unless the engine already holds ``policy``'s weights at ``weights_version``
        (another student object always counts as new weights)."""
        version = (id(policy), weights_version)
        if version != self.synced_version:
            self.sync(policy, weights_version)
            self.synced_version = version  # only once loaded: a failed sync is retried

    def setup(self, policy: nn.Module, tokenizer, trainer, max_model_len: int) -> None:  # noqa: ANN001
        """Check that this engine can run ``policy`` and prepare it (once per process)."""

    def generate(
        self, policy: nn.Module, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor,
        params: SamplingParams, *, seed: int, eos_token_ids: list[int], pad_token_id: int,
        weights_version: Hashable, generator: torch.Generator | None = None,
        all_ranks_done: Callable[[bool], bool] | None = None,
    ) -> SampleOutput:
        """Complete every left-padded prompt ``params.num_samples`` times with ``policy``'s current
        weights. ``seed`` fixes the draw (the same seed, weights and prompts give the same samples);
        the returned log-probs are those the engine sampled from (after temperature/top-k/top-p)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what :meth:`setup` built."""


class BuiltinEngine(RolloutEngine):
    """Samples with the student in the training process (``rollout/sampling.py``): the default.

    Weights need no sync — the student itself generates — so ``weights_version`` is ignored.
    ``generator``, when given, continues an existing random stream (a multi-turn episode draws its
    turns from one); otherwise a generator on the prompts' device is seeded with ``seed``.
    """

    def generate(
        self, policy: nn.Module, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor,
        params: SamplingParams, *, seed: int, eos_token_ids: list[int], pad_token_id: int,
        weights_version: Hashable = None, generator: torch.Generator | None = None,
        all_ranks_done: Callable[[bool], bool] | None = None,
    ) -> SampleOutput:
        if generator is None:
            generator = torch.Generator(device=prompt_ids_BP.device)
            generator.manual_seed(seed)
        return sample(policy, prompt_ids_BP, prompt_mask_BP, params, eos_token_ids, pad_token_id,
                      generator, all_ranks_done)
