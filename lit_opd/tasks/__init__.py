"""Synthetic verifiable tasks: a seeded generator, a prompt format and a verifier.

``RankingTask`` (ListOPD's JSON ranking task) lives in :mod:`lit_opd.methods.list_opd.ranking`;
it is still importable from here (and ``lit_opd.tasks.RankingTask`` in YAML keeps working).
"""

from lit_opd.tasks.base import Task
from lit_opd.tasks.addition import AdditionTask
from lit_opd.tasks.carry_addition import CarryAdditionTask, carry_bpe_tokenizer
from lit_opd.tasks.tokenizer import char_tokenizer
from lit_opd.tasks.tool_calc import ToolCalcTask, tool_calc_tokenizer

_RANKING_NAMES = ("RankingTask", "ndcg_at_k", "parse_ranking", "structural_positions")

__all__ = [
    "Task", "AdditionTask", "CarryAdditionTask", "carry_bpe_tokenizer", "char_tokenizer", "ToolCalcTask",
    "tool_calc_tokenizer", *_RANKING_NAMES
]


def __getattr__(name: str):  # noqa: ANN202 - PEP 562: imported on first use, avoiding an import cycle
    if name in _RANKING_NAMES:
        from lit_opd.methods.list_opd import ranking

        return getattr(ranking, name)
    raise AttributeError(f"module 'lit_opd.tasks' has no attribute {name!r}")
