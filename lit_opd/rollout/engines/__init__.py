"""Rollout engines: where the student's completions come from (``RolloutDataModule(engine=...)``)."""

from lit_opd.rollout.engines.base import BuiltinEngine, RolloutEngine
from lit_opd.rollout.engines.vllm import VLLMEngine, VLLMEngineError
from lit_opd.rollout.engines.vllm_server import VLLMServerEngine, VLLMServerUnreachable

__all__ = ["RolloutEngine", "BuiltinEngine", "VLLMEngine", "VLLMEngineError", "VLLMServerEngine",
           "VLLMServerUnreachable"]
