"""ListOPD calibration (lit_opd/methods/list_opd/README.md): the sets C_t, the position map, p_t / b_t /
λ*_t on tiny and on constructed models, and ``python -m lit_opd calibrate``.

The oracle-model test recovers the README's hand value λ*(0.99, 0.988, 0.2) = 1.223636;
changing it changes the recommended λ — note it in CHANGELOG.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from lit_opd.methods.list_opd.calibration import (
    RankingContract, answer_positions, build_batches, calibrate, encode_rows, token_texts, valid_token_ids,
)
from lit_opd.cli import cli_main
from lit_opd.methods.list_opd.cliff import lambda_star
from lit_opd.tasks import RankingTask, structural_positions
from tests.helpers import make_tiny_model

ANSWER = '{"ranking":["b","a","c","d"]}'


def _valid_texts(tok, prefix: str, answer: str = ANSWER) -> set[str]:
    contract = RankingContract.from_answer(answer)
    state = contract.feed(contract.start(), prefix)
    ids = valid_token_ids(contract, state, token_texts(tok), [tok.eos_token_id])
    return {tok.decode([i]) for i in ids}


def test_contract_valid_sets_by_hand(char_tok):
    ws = {" ", "\t", "\n", "\r"}
    assert _valid_texts(char_tok, "") == {"{"} | ws
    assert _valid_texts(char_tok, '{"ranking') == {'"'}  # inside the key: no whitespace
    assert _valid_texts(char_tok, '{"ranking":[') == {'"'} | ws
    assert _valid_texts(char_tok, '{"ranking":["') == {"a", "b", "c", "d"}
    assert _valid_texts(char_tok, '{"ranking":["b","') == {"a", "c", "d"}  # ids stay distinct
    assert _valid_texts(char_tok, '{"ranking":["b"') == {","} | ws  # not "]": K ids are needed
    assert _valid_texts(char_tok, '{"ranking":["b","a","c","d"') == {"]"} | ws
    assert _valid_texts(char_tok, ANSWER) == {"<eos>"} | ws  # trailing whitespace still parses
    contract = RankingContract.from_answer(ANSWER)
    assert contract.feed(contract.start(), '{"ranking":["\\u0062"') is None  # escapes are not followed
    assert contract.accepts(contract.feed(contract.start(), ' { "ranking" : [ "b" , "a","c","d" ] } '))
    with pytest.raises(ValueError, match="not a ranking"):
        RankingContract.from_answer('{"ranking":["a","a"]}')


def test_positions_follow_the_tokenizer(char_tok):
    n = len(char_tok(ANSWER, add_special_tokens=False).input_ids)
    positions = answer_positions(char_tok, ANSWER, n)
    assert [i for i, _ in positions] == structural_positions(ANSWER, include_eos=True)
    # a tokenizer with a multi-character token '","': its structural characters map to one token
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, '","': 3}
    for ch in sorted(set(ANSWER) | {" "}):
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r'","|[\s\S]'), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<eos>")
    ids = tok(ANSWER, add_special_tokens=False).input_ids
    positions = answer_positions(tok, ANSWER, len(ids))
    assert ids[14] == 3 and (14, 14) in positions and len(positions) == 19 - 3 * 2  # 3 × '","' merged
    assert _valid_texts(tok, ANSWER[:14]) == {'"', '","'}  # close the id, or close + comma + open


def test_calibration_on_tiny_random_models(char_tok):
    rows = RankingTask(k=4).make_rows(6, seed=0)
    teacher, base = make_tiny_model(len(char_tok), seed=1), make_tiny_model(len(char_tok), seed=0)
    report = calibrate(teacher, base, char_tok, rows, c=0.2)
    assert report.num_prompts == 6 and report.c == 0.2
    assert math.isfinite(report.lambda_star) and report.lambda_star > 0
    structural = set(structural_positions(rows[0]["answer"], include_eos=True))
    assert report.binding_position in structural
    assert 0 < report.p < 1 and 0 < report.b < 1
    for prompt in report.prompts:
        assert {s.position for s in prompt.positions} == structural
        assert all(0 < s.p < 1 and 0 < s.b < 1 for s in prompt.positions)
        for s in prompt.positions:  # λ*_t is lambda_star(p_t, b_t, c) where p_t > b_t, else +inf
            assert s.lambda_star == (lambda_star(s.p, s.b, 0.2) if s.p > s.b else math.inf)
    per_prompt = sorted(p.lambda_star for p in report.prompts)
    assert report.lambda_star == pytest.approx((per_prompt[2] + per_prompt[3]) / 2)  # the median of 6
    assert "lambda*" in report.table() and re.fullmatch(r"lambda_star \S+ binding_position \d+ p \S+ b \S+",
                                                         report.summary())


def test_teacher_equal_to_warm_start_has_no_cliff(char_tok):
    model = make_tiny_model(len(char_tok), seed=0)
    report = calibrate(model, model, char_tok, RankingTask(k=4).make_rows(3, seed=0), c=0.2)
    assert all(s.p == s.b and s.lambda_star == math.inf for p in report.prompts for s in p.positions)
    assert report.lambda_star == math.inf and report.binding_position is None
    assert math.isnan(report.p) and math.isnan(report.b)
    assert report.summary() == "lambda_star inf binding_position none p nan b nan"


class Oracle(nn.Module):
    """Teacher forcing only: puts probability ``p`` on the token that actually comes next, the rest
    spread evenly over the other V − 1 tokens."""

    def __init__(self, p: float, vocab: int) -> None:
        super().__init__()
        self.p, self.vocab = p, vocab
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, input_ids, logits_to_keep=0, **kwargs):  # noqa: ANN001, ANN003, ANN201
        B, L = input_ids.shape
        probs = torch.full((B, L, self.vocab), (1 - self.p) / (self.vocab - 1), dtype=torch.float64)
        probs[:, :-1].scatter_(-1, input_ids[:, 1:, None], self.p)
        return SimpleNamespace(logits=probs.log()[:, -logits_to_keep:])


def test_oracle_models_recover_the_hand_value(char_tok):
    V = len(char_tok)
    report = calibrate(Oracle(0.99, V), Oracle(0.988, V), char_tok, RankingTask(k=4).make_rows(2, 0), c=0.2)
    # single-token C_t (e.g. the closing quote of "ranking", position 9): p_t = 0.99, b_t = 0.988
    assert report.lambda_star == pytest.approx(1.223636, abs=1e-6)
    assert report.binding_position == 9
    assert report.p == pytest.approx(0.99) and report.b == pytest.approx(0.988)
    # with whitespace in C_t both tails shrink by the same factor: a slightly larger λ*_t
    stat = next(s for s in report.prompts[0].positions if s.position == 0)
    assert len(stat.valid_ids) == 5 and stat.p == pytest.approx(0.99 + 4 * 0.01 / (V - 1))
    assert stat.lambda_star > report.lambda_star
    # positions="all": every answer token; inside the first id string the 4 candidate ids are valid
    every = calibrate(Oracle(0.99, V), Oracle(0.988, V), char_tok, RankingTask(k=4).make_rows(1, 0), c=0.2,
                      positions="all")
    first_id = every.prompts[0].positions[13]
    assert len(every.prompts[0].positions) == 30 and len(first_id.valid_ids) == 4
    assert first_id.p == pytest.approx(0.99 + 3 * 0.01 / (V - 1))


def test_two_sided_calibration_counts_a_less_certain_teacher(char_tok):
    """Oracle teacher 0.9 against warm start 0.95 (p < b everywhere): one-sided there is no limit;
    two-sided the band's upper edge gives the hand value [logit .94 − logit .95]/[logit .9 − logit .95]."""
    V, rows = len(char_tok), RankingTask(k=4).make_rows(2, 0)
    one_sided = calibrate(Oracle(0.9, V), Oracle(0.95, V), char_tok, rows, c=0.2)
    assert one_sided.lambda_star == math.inf and one_sided.binding_position is None
    two_sided = calibrate(Oracle(0.9, V), Oracle(0.95, V), char_tok, rows, c=0.2, two_sided=True)
    assert two_sided.lambda_star == pytest.approx(0.2581637421, abs=1e-9)
    assert two_sided.binding_position == 9  # a single-token C_t, as in the hand-value test above
    assert two_sided.lambda_star == pytest.approx(lambda_star(0.9, 0.95, 0.2, two_sided=True))


def test_build_batches_checks_answers(char_tok):
    rows = RankingTask(k=4).make_rows(3, 0)
    batches = build_batches(char_tok, encode_rows(char_tok, rows), batch_size=2)
    assert [len(b.targets) for b in batches] == [2, 1]
    with pytest.raises(ValueError, match="reference 'answer'"):
        build_batches(char_tok, encode_rows(char_tok, [{"prompt": "x"}]))
    with pytest.raises(ValueError, match="not a ranking"):
        build_batches(char_tok, encode_rows(char_tok, [{"prompt": "x", "answer": "42"}]))


def test_calibrate_subcommand_prints_the_summary(student_dir, teacher_dir, capsys):
    cli_main(["calibrate", "--teacher", teacher_dir, "--student", student_dir, "--num_rows", "3",
              "--seed", "1", "--clip", "0.2", "--k", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["pos", "tok", "|C|"]
    assert re.fullmatch(r"lambda_star \S+ binding_position (\d+|none) p \S+ b \S+", lines[-1])
    cli_main(["calibrate", "--teacher", teacher_dir, "--student", student_dir, "--num_rows", "3",
              "--seed", "1", "--two_sided", "true"])
    two_sided = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"lambda_star \S+ binding_position (\d+|none) p \S+ b \S+", two_sided)
    assert float(two_sided.split()[1]) <= float(lines[-1].split()[1])  # more positions can only bind sooner
