"""Prompts → on-policy completions: sources, the sampler and the shared DataModule."""

from lit_opd.rollout.datamodule import RolloutDataModule
from lit_opd.rollout.sampling import SampleOutput, sample
from lit_opd.rollout.sources import JsonlPrompts, ListPrompts, PromptSource, TaskPrompts

__all__ = ["RolloutDataModule", "sample", "SampleOutput", "PromptSource", "JsonlPrompts", "ListPrompts", "TaskPrompts"]
