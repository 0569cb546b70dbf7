"""Synthetic verifiable tasks: a seeded generator, a prompt format and a verifier (``RankingTask``
is ListOPD's JSON ranking task)."""

from lit_opd.tasks.base import Task
from lit_opd.tasks.addition import AdditionTask
from lit_opd.tasks.carry_addition import CarryAdditionTask, carry_bpe_tokenizer
from lit_opd.tasks.ranking import RankingTask, ndcg_at_k, parse_ranking, structural_positions
from lit_opd.tasks.tokenizer import char_tokenizer
from lit_opd.tasks.tool_calc import ToolCalcTask, tool_calc_tokenizer

__all__ = [
    "Task", "AdditionTask", "CarryAdditionTask", "carry_bpe_tokenizer", "char_tokenizer", "RankingTask",
    "ndcg_at_k", "parse_ranking", "structural_positions", "ToolCalcTask", "tool_calc_tokenizer",
]
