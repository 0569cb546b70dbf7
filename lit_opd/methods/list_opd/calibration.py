"""Calibrate the extrapolation cliff λ* of a teacher / warm-start pair (ListOPD; README.md, "Calibration").

Paper: arXiv 2605.08737 (ListOPD). The recipe is our reading of its abstract (not the paper's
text): teacher-force valid reference answers on a calibration split, measure at every
structural position t the mass both models put on the contract-valid tokens C_t, and take the
position with the smallest clip-safe threshold:

    p_t = Σ_{v∈C_t} π_T(v | prompt, y_<t)        b_t = Σ_{v∈C_t} π_warm(v | prompt, y_<t)
    λ*_t = lambda_star(p_t, b_t, c)   if p_t > b_t,   else +inf   (two_sided: for p_t ≠ b_t)
    λ*(prompt) = min_t λ*_t   (its argmin is the prompt's binding position)
    λ* = median over prompts of λ*(prompt)

**C_t, precisely.** y_<t is the reference answer's first t tokens. A token v is in C_t when the
text y_<t ⊕ decode(v) is still a prefix of *some* output that parses under the contract
(:class:`RankingContract`: ``json.loads`` gives ``{"ranking": [K distinct candidate ids]}``); EOS
is in C_t when y_<t is already a complete valid output. So C_t holds the reference token plus JSON
whitespace where JSON allows it (``{`` or ``,`` positions: 5 tokens; inside a string, e.g. the
quote closing an id: 1), and inside an id string every unused candidate id (``positions="all"``).
Conservative approximations (C_t may miss a valid token, never holds an invalid one): string
escapes (``"\\u0061"`` spells ``a``) are not followed; special tokens other than EOS are never in C_t
(decoding drops them); each token is judged by its standalone ``decode([v])`` text.

**Positions.** ``structural_positions(answer, include_eos=True)`` (quotes and ``{}[],:`` outside
strings, plus the EOS slot) mapped to answer-token indices through the tokenizer's offsets (the
token that contains the character; the char tokenizer maps char i to token i). ``positions="all"``
uses every answer token. Positions are answer-token indices, so they line up across prompts when
answers have the same layout (the ranking task with a fixed K).

**No limit.** Where p_t ≤ b_t the teacher does not pull the valid class above the warm start, so
extrapolating does not push toward the lower tail edge: λ*_t = +inf (``two_sided=True`` instead
watches the upper edge there, where λ > 1 pushes the tail above the warm start's; see
:mod:`lit_opd.methods.list_opd.cliff`). With no finite λ*_t anywhere (e.g. teacher == warm start) the report has
λ* = +inf and no binding position: there is no cliff.

Run: ``python -m lit_opd calibrate --teacher T --student S --num_rows 64 --seed 0 --clip 0.2 --k 4``
(``--teacher_temperature τ`` calibrates ``HFTeacher(T, temperature=τ)``, the distribution it scores with).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from lit_opd.errors import SettingError
from lit_opd.methods.list_opd.cliff import lambda_star as lambda_star_fn
from lit_opd.models import completion_logits
from lit_opd.rollout.prompts import dataset_completions
from lit_opd.rollout.prompts import PromptTokenizer, collate_prompts
from lit_opd.tasks.ranking import ANSWER_KEY, parse_ranking, structural_positions
from lit_opd.types import RolloutBatch

JSON_WHITESPACE = frozenset(" \t\n\r")
PROB_EPS = 1e-12  # p and b are clamped into [eps, 1 − eps] so λ* stays finite in float64


# ----- the contract as a prefix automaton ------------------------------------------------------
class RankingContract:
    """Viable prefixes of ``{"ranking": [id_1, ..., id_k]}`` (JSON whitespace allowed between tokens,
    k distinct ids from ``candidates``). A state is a hashable tuple; ``feed`` returns None as soon as
    no valid output starts with the text fed so far."""

    # stages: 0 before "{", 1 before the key, 2 in the key, 3 before ":", 4 before "[", 5 before the
    # first id, 6 in an id, 7 after an id, 8 after ",", 9 after "]", 10 after "}" (complete)
    _EXPECT = {0: "{", 1: '"', 3: ":", 4: "[", 5: '"', 8: '"', 9: "}"}

    def __init__(self, candidates: Sequence[str], k: int) -> None:
        if not 1 <= k <= len(candidates) or len(set(candidates)) != len(candidates):
            raise SettingError(f"RankingContract needs distinct candidates, 1 <= k <= {len(candidates)}; k={k}")
        self.candidates, self.k = frozenset(candidates), k

    @classmethod
    def from_answer(cls, answer: str) -> RankingContract:
        """The contract of a reference ranking: its ids are the candidates and K is their number."""
        try:
            ids = json.loads(answer)[ANSWER_KEY]
        except (ValueError, TypeError, KeyError):
            ids = None
        if not isinstance(ids, list) or not ids or parse_ranking(answer, ids, len(ids)) is None:
            raise SettingError(f"answer={answer!r} is not a ranking under the contract; calibration needs one")
        return cls(ids, len(ids))

    def start(self) -> tuple:
        return (0, "", frozenset(), 0)

    def accepts(self, state: tuple) -> bool:
        return state[0] == 10

    def feed(self, state: tuple | None, text: str) -> tuple | None:
        for ch in text:
            if state is None:
                return None
            state = self._step(state, ch)
        return state

    def _step(self, state: tuple, ch: str) -> tuple | None:
        stage, buf, used, count = state
        if stage in (2, 6):
            return self._in_string(state, ch)
        if ch in JSON_WHITESPACE:
            return state
        if ch == self._EXPECT.get(stage):
            return ({0: 1, 1: 2, 3: 4, 4: 5, 5: 6, 8: 6, 9: 10}[stage], "", used, count)
        if stage == 7 and ch == "," and count < self.k:
            return (8, "", used, count)
        if stage == 7 and ch == "]" and count == self.k:
            return (9, "", used, count)
        return None

    def _in_string(self, state: tuple, ch: str) -> tuple | None:
        stage, buf, used, count = state
        if stage == 2:  # the key
            if ch == '"':
                return (3, "", used, count) if buf == ANSWER_KEY else None
            return (2, buf + ch, used, count) if ANSWER_KEY.startswith(buf + ch) else None
        unused = self.candidates - used
        if ch == '"':
            return (7, "", used | {buf}, count + 1) if buf in unused else None
        if ch == "\\" or not any(c.startswith(buf + ch) for c in unused):
            return None  # escapes are not followed (see the module docstring)
        return (6, buf + ch, used, count)


def token_texts(tokenizer) -> list[str | None]:  # noqa: ANN001 - any transformers tokenizer
    """``decode([v])`` per id; None for special tokens (EOS is handled separately)."""
    special = set(tokenizer.all_special_ids)
    return [None if i in special else tokenizer.decode([i]) for i in range(len(tokenizer))]


def valid_token_ids(
    contract: RankingContract, state: tuple, texts: Sequence[str | None], eos_ids: Sequence[int]
) -> tuple[int, ...]:
    """C_t: the ids whose text keeps ``state`` viable, plus EOS when ``state`` is complete."""
    ids = [i for i, text in enumerate(texts) if text and contract.feed(state, text) is not None]
    return tuple(sorted(set(ids + (list(eos_ids) if contract.accepts(state) else []))))


def answer_positions(
    tokenizer, answer: str, num_answer_tokens: int, positions: str = "structural"  # noqa: ANN001
) -> list[tuple[int, int]]:
    """``(token_index, char_start)`` of the calibrated positions; the EOS slot has index
    ``num_answer_tokens`` and char_start ``len(answer)``."""
    if positions == "all":
        chars = list(range(len(answer))) + [len(answer)]
    elif positions == "structural":
        chars = structural_positions(answer, include_eos=True)
    else:
        raise SettingError(f"positions={positions!r}: use 'structural' or 'all'")
    offsets = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) != num_answer_tokens:
        raise SettingError("the answer tokenizes differently with and without offsets")
    starts = [s for s, _ in offsets] + [len(answer)]
    ends = [e for _, e in offsets] + [len(answer) + 1]
    out: dict[int, int] = {}
    for ch in chars:
        index = next(j for j in range(len(starts)) if starts[j] <= ch < ends[j] or starts[j] >= ch)
        out.setdefault(index, starts[index])
    return sorted(out.items())


# ----- the report -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PositionStat:
    """One calibrated position of one prompt."""

    position: int
    token: str
    valid_ids: tuple[int, ...]
    p: float
    b: float
    lambda_star: float


@dataclass
class PromptCalibration:
    """All calibrated positions of one prompt; ``binding`` has the smallest λ*_t (None if all +inf)."""

    positions: list[PositionStat]

    @property
    def binding(self) -> PositionStat | None:
        finite = [s for s in self.positions if math.isfinite(s.lambda_star)]
        return min(finite, key=lambda s: (s.lambda_star, s.position)) if finite else None

    @property
    def lambda_star(self) -> float:
        return self.binding.lambda_star if self.binding else math.inf


@dataclass(frozen=True)
class PositionSummary:
    """A row of the per-position table: medians over prompts, and how often the position binds."""

    position: int
    token: str
    num_valid: int
    p: float
    b: float
    lambda_star: float
    binding_frac: float


@dataclass
class CalibrationReport:
    """λ* (median over prompts of the per-prompt minimum), the most frequent binding position and
    the median p and b there (``lambda_star(p, b, c)`` of those medians need not equal the median
    λ*). With no finite λ*_t anywhere: λ* = +inf, ``binding_position`` None, p = b = nan."""

    lambda_star: float
    binding_position: int | None
    p: float
    b: float
    per_position_table: list[PositionSummary]
    num_prompts: int
    c: float
    prompts: list[PromptCalibration] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        pos = "none" if self.binding_position is None else str(self.binding_position)
        return f"lambda_star {self.lambda_star:.6g} binding_position {pos} p {self.p:.6g} b {self.b:.6g}"

    def table(self) -> str:
        lines = [f"{'pos':>4} {'tok':>5} {'|C|':>4} {'p':>10} {'b':>10} {'lambda*':>10} {'binds':>6}"]
        for r in self.per_position_table:
            lines.append(f"{r.position:>4} {r.token!r:>5} {r.num_valid:>4} {r.p:>10.6f} {r.b:>10.6f} "
                         f"{r.lambda_star:>10.4g} {r.binding_frac:>6.2f}")
        return "\n".join(lines)


def _summarise(prompts: list[PromptCalibration], c: float) -> CalibrationReport:
    by_position: dict[int, list[PositionStat]] = {}
    for prompt in prompts:
        for stat in prompt.positions:
            by_position.setdefault(stat.position, []).append(stat)
    bindings = Counter(p.binding.position for p in prompts if p.binding is not None)
    median = statistics.median
    table = [
        PositionSummary(
            position=pos, token=stats[0].token, num_valid=int(median(len(s.valid_ids) for s in stats)),
            p=median(s.p for s in stats), b=median(s.b for s in stats),
            lambda_star=median(s.lambda_star for s in stats), binding_frac=bindings[pos] / len(prompts),
        )
        for pos, stats in sorted(by_position.items())
    ]
    binding = min(bindings, key=lambda pos: (-bindings[pos], pos)) if bindings else None
    row = next((r for r in table if r.position == binding), None)
    return CalibrationReport(
        lambda_star=statistics.median(p.lambda_star for p in prompts), binding_position=binding,
        p=row.p if row else math.nan, b=row.b if row else math.nan, per_position_table=table,
        num_prompts=len(prompts), c=c, prompts=prompts,
    )


# ----- teacher forcing --------------------------------------------------------------------------
@dataclass
class CalibrationBatch:
    """Teacher-forced prompts + reference answers, and per row the ``(position, C_t)`` to measure."""

    rollout: RolloutBatch
    targets: list[list[tuple[int, tuple[int, ...]]]]

    def to(self, device: torch.device | str) -> CalibrationBatch:
        r = self.rollout
        moved = replace(
            r, prompt_ids_BP=r.prompt_ids_BP.to(device), prompt_mask_BP=r.prompt_mask_BP.to(device),
            completion_ids_BT=r.completion_ids_BT.to(device), row_index_B=r.row_index_B.to(device),
            completion_mask_BT=r.completion_mask_BT.to(device),
        )
        return CalibrationBatch(moved, self.targets)


def encode_rows(tokenizer, rows: Sequence[Mapping], **prompt_settings) -> list[dict]:  # noqa: ANN001, ANN003
    """Rows → the records the RolloutDataModule builds (same PromptTokenizer, same defaults)."""
    settings = dict(max_prompt_tokens=512, over_long="error", use_chat_template=None, system_prompt=None)
    settings.update(prompt_settings)
    return PromptTokenizer(tokenizer, **settings).rows([dict(r) for r in rows], "calibration")


def build_batches(
    tokenizer, records: Sequence[Mapping], batch_size: int = 16, positions: str = "structural"  # noqa: ANN001
) -> list[CalibrationBatch]:
    """Teacher-forced batches of records with answers, and the contract-valid set C_t per position."""
    records = [r for r in records if r.get("answer") is not None]
    if not records:
        raise SettingError("calibration needs rows with a reference 'answer'")
    texts, eos = token_texts(tokenizer), tokenizer.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    cache: dict[tuple, tuple[int, ...]] = {}
    batches = []
    for start in range(0, len(records), batch_size):
        chunk = list(records[start : start + batch_size])
        rollout = dataset_completions(collate_prompts(chunk, tokenizer.pad_token_id), tokenizer.pad_token_id)
        targets = [_targets(tokenizer, rec, texts, eos_ids, positions, cache) for rec in chunk]
        batches.append(CalibrationBatch(rollout, targets))
    return batches


def _targets(
    tokenizer, rec: Mapping, texts: list[str | None], eos_ids: list[int],  # noqa: ANN001
    positions: str, cache: dict,
) -> list[tuple[int, tuple[int, ...]]]:
    """``(answer-token index, C_t)`` of one record's calibrated positions (C_t cached by state)."""
    answer, contract, out = rec["answer"], RankingContract.from_answer(rec["answer"]), []
    for index, char_start in answer_positions(tokenizer, answer, len(rec["answer_ids"]) - 1, positions):
        state = contract.feed(contract.start(), answer[:char_start])  # viable: the answer parses
        key = (state, contract.candidates, contract.k)
        if key not in cache:
            cache[key] = valid_token_ids(contract, state, texts, eos_ids)
        if rec["answer_ids"][index] not in cache[key]:
            raise SettingError(f"the reference token at answer position {index} of {answer!r} is not "
                             "contract-valid; is this a ranking answer?")
        out.append((index, cache[key]))
    return out


@torch.no_grad()
def class_log_masses(model: nn.Module, batch: CalibrationBatch) -> list[list[tuple[float, float]]]:
    """Per row and target: (log Σ_{v∈C_t} π(v|ctx), log Σ_{v∉C_t} π(v|ctx)), in float64."""
    logp_BTV = completion_logits(model, batch.rollout).double().log_softmax(-1)
    flat = [(row, index, valid) for row, targets in enumerate(batch.targets) for index, valid in targets]
    logp_NV = logp_BTV[[f[0] for f in flat], [f[1] for f in flat]]
    inside_NV = torch.zeros_like(logp_NV, dtype=torch.bool)
    for n, (_, _, valid) in enumerate(flat):
        inside_NV[n, list(valid)] = True
    masses = torch.stack([logp_NV.masked_fill(~inside_NV, -math.inf).logsumexp(-1),
                          logp_NV.masked_fill(inside_NV, -math.inf).logsumexp(-1)], dim=-1).tolist()
    out, start = [], 0
    for targets in batch.targets:
        out.append([tuple(m) for m in masses[start : start + len(targets)]])
        start += len(targets)
    return out


def _mass(log_inside: float) -> float:
    return min(max(math.exp(log_inside), PROB_EPS), 1.0 - PROB_EPS)


def calibrate_batches(
    teacher: nn.Module, base: nn.Module, tokenizer, batches: Sequence[CalibrationBatch],  # noqa: ANN001
    c: float = 0.2, anchor: str = "base", two_sided: bool = False,
) -> CalibrationReport:
    """Calibrate on teacher-forced batches (:func:`build_batches`, on the models' device).
    ``teacher`` and ``base`` (the warm start) are causal LMs."""
    prompts = []
    for batch in batches:
        teacher_masses, base_masses = class_log_masses(teacher, batch), class_log_masses(base, batch)
        for row, targets in enumerate(batch.targets):
            stats = []
            for (index, valid), (t_in, _), (b_in, _) in zip(targets, teacher_masses[row], base_masses[row]):
                p, b = _mass(t_in), _mass(b_in)
                # one-sided, p ≤ b: no limit here (two-sided, lambda_star handles every p, b)
                lam = lambda_star_fn(p, b, c, anchor, two_sided) if p > b or two_sided else math.inf
                token = tokenizer.decode([int(batch.rollout.completion_ids_BT[row, index])])
                stats.append(PositionStat(index, token, valid, p, b, lam))
            prompts.append(PromptCalibration(stats))
    return _summarise(prompts, c)


def calibrate(
    teacher: nn.Module, base: nn.Module, tokenizer, rows: Sequence[Mapping], c: float = 0.2,  # noqa: ANN001
    anchor: str = "base", batch_size: int = 16, positions: str = "structural", two_sided: bool = False,
    **prompt_settings,  # noqa: ANN003
) -> CalibrationReport:
    """Calibrate on task rows (``prompt`` + ``answer``), encoded like the RolloutDataModule does
    (``prompt_settings``: its ``max_prompt_tokens``, ``over_long``, ``use_chat_template``, ...)."""
    records = encode_rows(tokenizer, rows, **prompt_settings)
    device = next(base.parameters()).device
    batches = [b.to(device) for b in build_batches(tokenizer, records, batch_size, positions)]
    return calibrate_batches(teacher, base, tokenizer, batches, c, anchor, two_sided)


@torch.no_grad()
def binding_tail_ratios(
    student: nn.Module, batches: Sequence[CalibrationBatch], report: CalibrationReport
) -> Tensor:
    """(1 − Q_C)/(1 − b) at each prompt's binding position: Q_C the student's current mass on C_t,
    b the warm start's (from ``report``). One value per prompt that has a binding position."""
    ratios, prompts = [], iter(report.prompts)
    for batch in batches:
        for row, log_masses in enumerate(class_log_masses(student, batch)):
            binding = next(prompts).binding
            if binding is not None:
                j = [index for index, _ in batch.targets[row]].index(binding.position)
                ratios.append(math.exp(log_masses[j][1]) / (1.0 - binding.b))
    return torch.tensor(ratios, dtype=torch.float64)
