"""Text similarity φ(chunk, continuation) ∈ [0, 1] and the semantic count k_sem of one audit.

Every φ here gives 1 for equal strings, 0 for strings with nothing in common, and is symmetric.
``SIMILARITIES`` is the registry a config names (``similarity: edit``); a dotted import path to a
function ``(text, text) -> float`` or (from Python) a callable plugs in another one.

Before φ is applied the teacher's continuation is cut to the chunk's character length
(:func:`compared_text`), so a teacher that wrote more than the chunk is not penalised for the extra.
"""

from __future__ import annotations

import importlib
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from lit_opd.errors import SettingError

Similarity = Callable[[str, str], float]

_WORD = re.compile(r"\w+")
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = str.maketrans("", "", string.punctuation)


# ----- edit distance ------------------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insertions, deletions, substitutions; cost 1 each).

    Bit-parallel (Myers 1999, Hyyrö's form for the global distance): one pass over the longer string
    with Python integers as bit vectors over the shorter one, so a pair of 200-character chunks costs
    200 steps instead of the 40 000 of the textbook table.
    """
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    match: dict[str, int] = {}
    for i, ch in enumerate(b):
        match[ch] = match.get(ch, 0) | (1 << i)
    full, top = (1 << m) - 1, 1 << (m - 1)
    plus, minus, score = full, 0, m  # vertical +1 / −1 deltas of the current column; D[m][j]
    for ch in a:
        eq = match.get(ch, 0)
        xv = eq | minus
        xh = (((eq & plus) + plus) ^ plus) | eq
        h_plus = minus | ~(xh | plus)
        h_minus = plus & xh
        if h_plus & top:
            score += 1
        elif h_minus & top:
            score -= 1
        h_plus = (h_plus << 1) | 1  # row 0 grows by one per character of ``a``
        h_minus <<= 1
        plus = (h_minus | ~(xv | h_plus)) & full
        minus = h_plus & xv & full
    return score


def edit_similarity(a: str, b: str) -> float:
    """1 − Levenshtein(a, b) / max(|a|, |b|); 1 for two empty strings."""
    if a == b:
        return 1.0
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))


# ----- word overlap -------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    """ROUGE's tokens: lower-cased runs of letters, digits and underscores."""
    return _WORD.findall(text.lower())


def _f1(overlap: float, n_a: int, n_b: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_a, overlap / n_b
    return 2 * precision * recall / (precision + recall)


def _bag_f1(a: list[str], b: list[str]) -> float:
    if not a or not b:
        return 0.0
    return _f1(sum((Counter(a) & Counter(b)).values()), len(a), len(b))


def rouge1_f1(a: str, b: str) -> float:
    """ROUGE-1 F1: unigram overlap (with multiplicity) of the two word sequences."""
    return 1.0 if a == b else _bag_f1(_words(a), _words(b))


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_f1(a: str, b: str) -> float:
    """ROUGE-L F1: longest common subsequence of the two word sequences (word order counts)."""
    if a == b:
        return 1.0
    wa, wb = _words(a), _words(b)
    return _f1(_lcs(wa, wb), len(wa), len(wb)) if wa and wb else 0.0


def _squad_words(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, whitespace split."""
    return [w for w in text.lower().translate(_PUNCTUATION).split() if w not in _ARTICLES]


def token_f1(a: str, b: str) -> float:
    """SQuAD token F1: bag-of-words overlap after dropping case, punctuation and articles."""
    return 1.0 if a == b else _bag_f1(_squad_words(a), _squad_words(b))


def exact_match(a: str, b: str) -> float:
    """1 when the texts are equal after stripping surrounding whitespace, else 0: for chunks where any
    difference is a mistake (digits, identifiers), which partial-credit measures score near 1."""
    return float(a.strip() == b.strip())


SIMILARITIES: dict[str, Similarity] = {
    "edit": edit_similarity,
    "exact": exact_match,
    "rouge1": rouge1_f1,
    "rougeL": rouge_l_f1,
    "token_f1": token_f1,
}


def resolve_similarity(spec: str | Similarity) -> tuple[str, Similarity]:
    """(name, function) for a registry name, a dotted path ``package.module.function`` or a callable."""
    if callable(spec):
        name = getattr(spec, "__qualname__", type(spec).__name__)
        return f"{getattr(spec, '__module__', '?')}.{name}", spec
    hint = (f"use one of {sorted(SIMILARITIES)}, a dotted path to a function (text, text) -> [0, 1], "
            "or pass a callable")
    if not isinstance(spec, str):
        raise SettingError(f"SpeculativeVerification.similarity={spec!r}: {hint}")
    if spec in SIMILARITIES:
        return spec, SIMILARITIES[spec]
    module_name, _, attr = spec.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr) if module_name else None
    except (ImportError, AttributeError):
        fn = None
    if not callable(fn):
        raise SettingError(f"SpeculativeVerification.similarity={spec!r} is neither a known name nor an "
                         f"importable function: {hint}")
    return spec, fn


# ----- one audit ----------------------------------------------------------------------------------
def compared_text(continuation: str, chunk: str, chunk_ends: bool) -> str:
    """The part of a teacher continuation that is compared with the student's chunk.

    Cut to the chunk's character length: the teacher was asked for about as many tokens of *its*
    tokenizer, so its text is usually longer or shorter than the chunk, and the part beyond the
    chunk says nothing about the chunk. When the chunk ends the completion (its last token is an
    EOS) the whole continuation is kept: the student stopped there, and a teacher that goes on
    disagrees; cutting would turn an empty chunk into a match with anything.
    """
    return continuation if chunk_ends else continuation[: len(chunk)]


def semantic_count(
    chunk: str, continuations: Sequence[str | None], similarity: Similarity, chunk_ends: bool = False
) -> tuple[float, int]:
    """(k_sem, answered): Σ_j φ(chunk, cut continuation_j) over the continuations the teacher gave
    (None, a failed request, is skipped) and how many it gave."""
    k_sem, answered = 0.0, 0
    for text in continuations:
        if text is None:
            continue
        value = float(similarity(chunk, compared_text(text, chunk, chunk_ends)))
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise SettingError(f"SpeculativeVerification.similarity returned {value!r} for ({chunk!r}, "
                             f"{text!r}); a similarity must lie in [0, 1]")
        k_sem, answered = k_sem + value, answered + 1
    return k_sem, answered
