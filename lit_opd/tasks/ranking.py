"""Listwise JSON ranking: a near-deterministic structured output for ListOPD (lit_opd/methods/list_opd/README.md).

A row asks for the K candidates ordered by relevance to a query, answered under a strict JSON
contract. A tiny character-level model can learn it: ids are the first K lowercase letters, each
candidate has a color (uppercase letter) and a size (digit), and the order is a bucket sort.

Prompt (58 characters for K=8, printable ASCII, one token per character with ``char_tokenizer``)::

    color=R size<5 | a:R3 b:G7 c:B2 d:R6 e:G1 f:R4 g:B9 h:G5 >

Relevance (graded, 0..3) and order::

    rel(i) = 2·[color_i = query color] + [size_i < query size]
    order  = candidates sorted by (−rel, id)        (ties broken by id, ascending)

Answer contract, serialised compactly (``json.dumps(..., separators=(",", ":"))``)::

    {"ranking":["a","f","d","c","e","b","g","h"]}

Parse-valid (:func:`parse_ranking`): ``json.loads`` succeeds (so JSON whitespace is allowed and
trailing text is not), the value is an object with the single key ``"ranking"``, holding exactly K
distinct string ids, all from the candidates. ``verify`` is exact equality of the parsed ranking
with the reference; :meth:`RankingTask.score` reports validity and NDCG@1 / NDCG@K on parsed outputs.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Mapping, Sequence

import torch
from torchmetrics.functional.retrieval import retrieval_normalized_dcg

from lit_opd.errors import SettingError
from lit_opd.tasks.base import Task

ANSWER_KEY = "ranking"
JSON_PUNCTUATION = frozenset("{}[],:")
MAX_K = 26


def serialise_ranking(ids: Sequence[str]) -> str:
    """The canonical compact answer: ``{"ranking":["a","c",...]}`` (no spaces)."""
    return json.dumps({ANSWER_KEY: list(ids)}, separators=(",", ":"))


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise SettingError(f"duplicate keys {keys}")
    return dict(pairs)


def parse_ranking(text: str, candidate_ids: Sequence[str], k: int) -> list[str] | None:
    """The ranking in ``text`` under the strict contract, or None when it breaks the contract.

    Valid iff ``json.loads(text)`` succeeds (no trailing text, no duplicate keys) and gives
    ``{"ranking": [id_1, ..., id_k]}`` with exactly ``k`` distinct strings, each in ``candidate_ids``.
    """
    if k < 1:
        raise SettingError(f"k={k!r} must be >= 1")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except ValueError:  # json.JSONDecodeError is a ValueError, and so is a duplicate key
        return None
    if not isinstance(obj, dict) or list(obj) != [ANSWER_KEY]:
        return None
    ids = obj[ANSWER_KEY]
    if not isinstance(ids, list) or len(ids) != k or not all(isinstance(i, str) for i in ids):
        return None
    if len(set(ids)) != k or not set(ids) <= set(candidate_ids):
        return None
    return ids


def ndcg_at_k(pred: Sequence[str], reference_relevance: Mapping[str, int], k: int) -> float:
    """NDCG@k of the ranking ``pred`` against graded relevance (torchmetrics, linear gain).

    NDCG@k = DCG@k(pred) / DCG@k(ideal), DCG@k = Σ_{i<k} rel(pred_i) / log2(i + 2). Candidates
    missing from ``pred`` share the score below the last ranked one (ties averaged by torchmetrics).
    All-zero relevance gives 0. ``pred`` must hold distinct ids of ``reference_relevance``.
    torchmetrics accumulates in float32, so a perfect ranking gives 1 to within ~1e-7.
    """
    if k < 1:
        raise SettingError(f"k={k!r} must be >= 1")
    unknown = [i for i in pred if i not in reference_relevance]
    if unknown or len(set(pred)) != len(pred):
        raise SettingError(f"pred={list(pred)!r} must hold distinct ids of reference_relevance")
    ids = list(reference_relevance)
    rel = [reference_relevance[i] for i in ids]
    if not all(isinstance(r, int) and r >= 0 for r in rel):
        raise SettingError(f"reference_relevance values must be non-negative ints, got {rel}")
    position = {item: i for i, item in enumerate(pred)}
    scores = [float(len(pred) - position[i]) if i in position else 0.0 for i in ids]
    ndcg = retrieval_normalized_dcg(torch.tensor(scores), torch.tensor(rel, dtype=torch.long), top_k=k)
    return float(ndcg)


def structural_positions(answer_text: str, include_eos: bool = False) -> list[int]:
    """Character indices where the JSON contract is decided: quotes and ``{ } [ ] , :`` outside strings.

    With ``char_tokenizer`` character i is answer token i, and the datamodule appends EOS at index
    ``len(answer_text)``; ``include_eos=True`` adds that index (stopping there is also contractual:
    any trailing text breaks parsing). Used to calibrate p and b per position (README.md, "Calibration").
    """
    positions: list[int] = []
    in_string = escaped = False
    for i, ch in enumerate(answer_text):
        if in_string and escaped:
            escaped = False
        elif in_string and ch == "\\":
            escaped = True
        elif ch == '"':
            positions.append(i)
            in_string = not in_string
        elif not in_string and ch in JSON_PUNCTUATION:
            positions.append(i)
    if include_eos:
        positions.append(len(answer_text))
    return positions


def relevance_order(
    query_color: str, query_size: int, attrs: Mapping[str, tuple[str, int]]
) -> tuple[dict[str, int], list[str]]:
    """rel(i) = 2·[color_i = query_color] + [size_i < query_size]; order = ids sorted by (−rel, id)."""
    relevance = {i: 2 * int(col == query_color) + int(size < query_size) for i, (col, size) in attrs.items()}
    return relevance, sorted(relevance, key=lambda i: (-relevance[i], i))


def _reference_ids(answer: str) -> list[str]:
    """The ids of a reference answer; raises (naming ``answer``) when it is not a ranking."""
    try:
        obj = json.loads(answer)
    except ValueError:
        obj = None
    ids = obj.get(ANSWER_KEY) if isinstance(obj, dict) else None
    if not isinstance(ids, list) or not ids or parse_ranking(answer, ids, len(ids)) is None:
        raise SettingError(f"answer={answer!r} is not a reference ranking like {serialise_ranking(['a', 'b'])}")
    return ids


class RankingTask(Task):
    """Rank K candidates (ids ``a``, ``b``, ...) by color match, then size below a threshold.

    Rows: ``prompt``, ``answer`` (the canonical JSON string), ``candidates`` (ids in prompt order)
    and ``relevance`` (``{id: 0..3}``). The extra keys are metadata for :meth:`score`; the rollout
    pipeline reads only ``prompt`` and ``answer``.

    Args:
        k: number of candidates K (2..26); every answer ranks all of them.
        colors: the color alphabet, distinct uppercase letters (at least 2).
    """

    def __init__(self, k: int = 8, colors: str = "RGBY") -> None:
        if not 2 <= k <= MAX_K:
            raise SettingError(f"RankingTask needs 2 <= k <= {MAX_K}, got k={k}")
        distinct = len(set(colors)) == len(colors) >= 2
        if not distinct or not set(colors) <= set(string.ascii_uppercase):
            raise SettingError(f"RankingTask.colors={colors!r} must be at least 2 distinct uppercase letters")
        self.k = k
        self.colors = colors
        self.ids = list(string.ascii_lowercase[:k])

    def _row(self, rng: random.Random) -> dict:
        query_color, query_size = rng.choice(self.colors), rng.randint(1, 9)
        attrs = {i: (rng.choice(self.colors), rng.randint(0, 9)) for i in self.ids}
        relevance, order = relevance_order(query_color, query_size, attrs)
        items = " ".join(f"{i}:{color}{size}" for i, (color, size) in attrs.items())
        return {
            "prompt": f"color={query_color} size<{query_size} | {items} >",
            "answer": serialise_ranking(order),
            "candidates": list(self.ids),
            "relevance": relevance,
        }

    def make_rows(self, num_rows: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        return [self._row(rng) for _ in range(num_rows)]

    def verify(self, completion: str, answer: str | None) -> bool:
        """Strict: the completion parses under the contract and equals the reference ranking."""
        if answer is None:
            return False
        reference = _reference_ids(answer)
        return parse_ranking(completion, reference, len(reference)) == reference

    def score(self, completion: str, row: Mapping) -> dict[str, bool | float | None]:
        """``{"valid", "ndcg@1", "ndcg@k"}``; the NDCGs are None when the completion does not parse."""
        candidates = list(row["candidates"])
        pred = parse_ranking(completion, candidates, len(candidates))
        if pred is None:
            return {"valid": False, "ndcg@1": None, "ndcg@k": None}
        relevance = row["relevance"]
        return {
            "valid": True,
            "ndcg@1": ndcg_at_k(pred, relevance, 1),
            "ndcg@k": ndcg_at_k(pred, relevance, len(candidates)),
        }
