"""OmniOPD's pure parts: the similarity functions and their registry, the continuation cut, the
peak-entropy picker, the posterior target and the loop detector, on hand values."""

from __future__ import annotations

import random

import pytest
import torch

from lit_opd.methods.omni_opd import (
    SIMILARITIES, pick_audits, posterior_target, repetition_loops, semantic_count,
)
from lit_opd.methods.omni_opd.audits import chunk_starts_allowed
from lit_opd.methods.omni_opd.objective import chunk_weights
from lit_opd.methods.omni_opd.similarity import compared_text, levenshtein, resolve_similarity


def _table_levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i]
        for j, y in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def test_bit_parallel_levenshtein_equals_the_textbook_table():
    rng = random.Random(0)
    for _ in range(500):
        a = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 25)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 70)))  # beyond one 64-bit word
        assert levenshtein(a, b) == _table_levenshtein(a, b), (a, b)
    assert levenshtein("kitten", "sitting") == 3


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_every_similarity_is_one_on_equal_zero_on_disjoint_symmetric_and_bounded(name):
    phi = SIMILARITIES[name]
    for text in ("", "76", "the cat sat on the mat", "x = f(y) + 1"):
        assert phi(text, text) == 1.0
    assert phi("abcd", "xyzw") == 0.0 and phi("cat sat", "dog ran") < 0.3
    assert phi("12", "") == 0.0
    rng = random.Random(1)
    words = ["the", "cat", "sat", "mat", "on", "a", "dog", "7", "42"]
    for _ in range(200):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        assert 0.0 <= phi(a, b) <= 1.0
        assert phi(a, b) == pytest.approx(phi(b, a))


def test_similarity_hand_values():
    assert SIMILARITIES["edit"]("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert SIMILARITIES["edit"]("76", "75") == 0.5
    # ROUGE-1 ignores order, ROUGE-L does not: LCS("the cat sat", "cat the sat") = 2 of 3 words
    assert SIMILARITIES["rouge1"]("the cat sat", "cat the sat") == 1.0
    assert SIMILARITIES["rougeL"]("the cat sat", "cat the sat") == pytest.approx(2 / 3)
    # token F1 drops case, punctuation and articles: {cat, sat} vs {cat, ran} -> P = R = 1/2
    assert SIMILARITIES["token_f1"]("The cat sat.", "a cat ran") == pytest.approx(0.5)
    # one wrong digit of a carry column: partial credit from edit, none from exact
    assert SIMILARITIES["edit"]("4+7+0=11|", "3+7+0=10|") == pytest.approx(7 / 9)
    assert SIMILARITIES["exact"]("4+7+0=11|", "3+7+0=10|") == 0.0
    assert SIMILARITIES["exact"](" 3+7+0=10|", "3+7+0=10|\n") == 1.0


def test_registry_resolves_names_dotted_paths_and_callables_and_names_bad_ones():
    assert resolve_similarity("edit") == ("edit", SIMILARITIES["edit"])
    name, fn = resolve_similarity("lit_opd.methods.omni_opd.similarity.rouge1_f1")
    assert fn is SIMILARITIES["rouge1"] and name.endswith("rouge1_f1")

    def exact(a: str, b: str) -> float:
        return float(a == b)

    assert resolve_similarity(exact)[1] is exact
    for bad in ("cosine", "no.such.module.fn", 3):
        with pytest.raises(ValueError, match="SpeculativeVerification.similarity.*edit"):
            resolve_similarity(bad)


def test_continuation_is_cut_to_the_chunk_length_unless_the_chunk_ends_the_completion():
    # a teacher that wrote past the chunk is not penalised for the surplus ...
    assert compared_text("76 and more", "76", chunk_ends=False) == "76"
    k_sem, answered = semantic_count("76", ["76 and more", "75", None, "7"], SIMILARITIES["edit"])
    assert (k_sem, answered) == (pytest.approx(1 + 0.5 + 0.5), 3)  # "7" vs "76": one edit in two
    # ... but where the student stopped (EOS in the chunk), a teacher that goes on disagrees
    assert compared_text("76 and more", "76", chunk_ends=True) == "76 and more"
    assert semantic_count("", ["", "1"], SIMILARITIES["edit"], chunk_ends=True) == (1.0, 2)


def test_a_similarity_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        semantic_count("a", ["a"], lambda a, b: 2.0)


# ----- the picker ---------------------------------------------------------------------------------
H_HAND = [0.1, 2.0, 0.3, 0.2, 1.5, 1.6, 0.1]


def _pick(entropy, mask=None, chunk=2, audits=2):  # noqa: ANN001, ANN202
    entropy_BT = torch.tensor([entropy])
    mask_BT = torch.ones_like(entropy_BT, dtype=torch.bool) if mask is None else torch.tensor([mask])
    return pick_audits(entropy_BT, mask_BT, chunk, audits)[0]


def test_picker_hand_value():
    # 1 (H 2.0) first; 5 (1.6) next; 4 (1.5) would overlap 5's chunk
    assert _pick(H_HAND) == [1, 5]


def test_picker_ties_go_to_the_later_position_and_chunks_do_not_overlap():
    assert _pick([1.0, 1.0, 1.0, 1.0], chunk=2, audits=1) == [2]
    assert _pick([1.0, 1.0, 1.0, 1.0], chunk=2, audits=3) == [0, 2]
    assert _pick([0.0, 3.0, 3.0, 0.0, 0.0], chunk=3, audits=2) == [2]  # 1 and 2 overlap; 3+ runs past the end


def test_picker_edge_cases():
    assert _pick([2.0, 1.0], chunk=3) == []  # shorter than C: no audit
    assert _pick([0.5, 0.4, 0.3], chunk=3) == [0]  # exactly C: one audit at 0
    assert _pick(H_HAND, chunk=2, audits=10) == [1, 3, 5]  # M larger than fits: as many as fit (0 then can't)
    # the chunk may not run past the loss mask (the padded end of a row)
    assert _pick([0.0, 0.0, 0.0, 5.0, 9.0], mask=[True, True, True, True, False], chunk=2, audits=1) == [2]
    # nor across a hole in it (e.g. a tool's output inside the completion)
    mask = [True, True, False, True, True]
    assert chunk_starts_allowed(torch.tensor([mask]), 2).tolist() == [[True, False, False, True, False]]
    assert _pick([0.0, 9.0, 0.0, 1.0, 0.0], mask=mask, chunk=2, audits=2) == [0, 3]


def test_picker_per_row_and_in_increasing_order():
    entropy_BT = torch.tensor([H_HAND, list(reversed(H_HAND))])
    mask_BT = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    # row 1: starts 0..3 fit in its 5 tokens; 1 (1.6) then 3 (0.2 beats 0's 0.1)
    assert pick_audits(entropy_BT, mask_BT, 2, 2) == [[1, 5], [1, 3]]


# ----- the target and the loop detector -----------------------------------------------------------
def test_posterior_target_hand_value():
    target = posterior_target(torch.tensor([7.0]), torch.tensor([10.0]), torch.tensor([0.5]), alpha=1.0)
    assert target.item() == pytest.approx(7.5 / 11)  # 0.681818
    # the prior bounds it: no continuation agrees -> α π̄ / (N + α); all agree with π̄ = 1 -> 1
    none_agree = posterior_target(torch.tensor([0.0]), torch.tensor([4.0]), torch.tensor([0.5]), 1.0)
    assert none_agree.item() == pytest.approx(0.1)
    assert posterior_target(torch.tensor([4.0]), torch.tensor([4.0]), torch.tensor([1.0]), 1.0).item() == 1.0


def test_chunk_weights_hand_values():
    target = torch.tensor([0.9, 0.3])
    pi_bar = torch.tensor([0.5, 0.6])
    assert chunk_weights(target, pi_bar, "none").tolist() == pytest.approx([0.9, 0.3])
    assert chunk_weights(target, pi_bar, "batch").tolist() == pytest.approx([0.3, -0.3])
    # "prior": π̂ − π̄ = (k_sem − N·π̄)/(N + α); k_sem 7 of N 10, α 1, π̄ 0.5 -> 2/11
    prior = chunk_weights(posterior_target(torch.tensor([7.0]), torch.tensor([10.0]), torch.tensor([0.5]), 1.0),
                          torch.tensor([0.5]), "prior")
    assert prior.item() == pytest.approx(2 / 11)


def test_repetition_loops():
    def loops(seq: list[int], length: int | None = None) -> bool:
        ids_BT = torch.tensor([seq])
        mask_BT = torch.arange(len(seq)).unsqueeze(0) < (length or len(seq))
        return bool(repetition_loops(ids_BT, mask_BT)[0])

    assert loops([5, 6] * 6)  # one 2-gram six times, 12 tokens
    assert not loops([5, 6] * 5 + [7, 8])  # 10 periodic tokens: too short a stretch
    assert loops([1, 2, 3, 4, 5] * 3 + [9])  # a 5-gram three times (15 tokens)
    assert not loops([1, 2, 3, 4, 5, 6, 7] * 2 + [1, 2])  # 7-gram twice: fewer than 3 repeats
    assert loops([7] * 12) and not loops([7] * 11)
    assert not loops([7] * 12, length=8)  # the padding does not count
    assert not loops(list(range(40)))
