"""Synthetic verifiable tasks: a seeded generator, a prompt format and a verifier."""

from lit_opd.tasks.base import Task
from lit_opd.tasks.addition import AdditionTask
from lit_opd.tasks.ranking import RankingTask, ndcg_at_k, parse_ranking, structural_positions
from lit_opd.tasks.tokenizer import char_tokenizer

__all__ = [
    "Task", "AdditionTask", "RankingTask", "char_tokenizer", "ndcg_at_k", "parse_ranking", "structural_positions",
]
