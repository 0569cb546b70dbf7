"""Prompts → on-policy completions: sources, the rollout engines and the shared DataModule."""

from lit_opd.rollout.datamodule import RolloutDataModule
from lit_opd.rollout.evaluation import Evaluation, pass_at_k
from lit_opd.rollout.engines import BuiltinEngine, RolloutEngine, VLLMEngine, VLLMServerEngine
from lit_opd.rollout.hf_datasets import HFDatasetPrompts
from lit_opd.rollout.sampler import GroupedPromptSampler, ResumablePromptSampler
from lit_opd.rollout.sampling import SampleOutput, sample
from lit_opd.rollout.sources import JsonlPrompts, ListPrompts, PromptSource, TaskPrompts
from lit_opd.rollout.turns import EpisodeRolloutDataModule, TurnPrompts, split_turns
from lit_opd.rollout.verifiers import ExactMatch, MathVerify, RegexMatch, Verifier

__all__ = [
    "RolloutDataModule", "RolloutEngine", "BuiltinEngine", "VLLMEngine", "VLLMServerEngine", "sample",
    "SampleOutput", "PromptSource", "JsonlPrompts", "ListPrompts", "TaskPrompts", "TurnPrompts", "split_turns",
    "EpisodeRolloutDataModule", "GroupedPromptSampler", "ResumablePromptSampler",
    "HFDatasetPrompts", "Verifier", "ExactMatch", "RegexMatch", "MathVerify",
    "Evaluation", "pass_at_k",
]
