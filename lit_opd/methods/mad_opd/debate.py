"""The blind debate of MAD-OPD: its texts, its rounds, the confidence it yields and the context in
which each teacher then scores the student's answer.

Blind: no debate prompt ever holds the student's completion (or a reference answer). Round 1: each
teacher answers the prompt on its own; rounds 2..R: each sees the prompt and the whole transcript so
far and reconsiders as "Expert A", "Expert B", ... Each round is one ``generate_text`` call per
teacher over every prompt of the batch. The confidence of teacher k is the last ``<<CONFIDENCE=N>>``
tag of its last-round answer; for models that emit no tags, ``100 · exp(mean log-prob of its own
last answer)`` can stand in (``DebateSettings.confidence``).
"""

from __future__ import annotations

import re
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from lit_opd.errors import SettingError
from lit_opd.objectives.paths import teacher_token_logp
from lit_opd.rollout.prompts import collate_prompts
from lit_opd.teachers.base import Teacher
from lit_opd.types import RolloutBatch

CONFIDENCE_TAG = re.compile(r"<<CONFIDENCE=(\d+)>>")
LABELS = string.ascii_uppercase  # Expert A, B, ...: at most 26 teachers debate


def last_confidence(text: str | None) -> float | None:
    """N of the last ``<<CONFIDENCE=N>>`` tag in ``text`` (capped at 100), or None without one."""
    found = CONFIDENCE_TAG.findall(text or "")
    return min(float(found[-1]), 100.0) if found else None


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def _braced(names: set[str]) -> list[str]:
    return sorted("{" + n + "}" for n in names)


@dataclass(frozen=True)
class DebatePrompts:
    """The debate's texts; ``{...}`` are filled in (``{prompt}`` the task prompt, ``{transcript}``
    the debate so far, ``{expert}`` the teacher's letter, ``{confidence}`` the confidence request).

    Args:
        first_round: round 1, each teacher alone (needs ``{prompt}``).
        next_round: rounds 2..R (needs ``{prompt}``, ``{transcript}``, ``{expert}``).
        force_decode: the context after which teacher k scores the student's completion; its end is
            the cue the completion follows. With ``{transcript}`` (the paper) the teachers judge with
            the debate as privileged context; without it (``{prompt}`` only) they judge the bare prompt
            and only the weights come from the debate (an ablation, or teachers that cannot read one).
        confidence_request: put in ``{confidence}`` when tags are asked for (else empty).
        entry: one transcript entry (``{expert}``, ``{round}``, ``{answer}``).
        start, end: the lines that open and close the transcript.
    """

    first_round: str = ("You are an expert. Solve the following problem step by step.\n\n"
                        "Question: {prompt}\n\nYour solution:{confidence}")
    next_round: str = ("{prompt}\n\nBelow is a debate between experts on this problem:\n\n{transcript}\n\n"
                       "You are Expert {expert}. You need not agree with the others. Having read the debate, "
                       "reconsider the problem and give your improved answer.{confidence}")
    force_decode: str = ("{prompt}\n\nYou are Expert {expert}. Below is the debate between you and the "
                         "other experts:\n\n{transcript}\n\nBased on the debate, solve the problem again "
                         "your own way:")
    confidence_request: str = ("\n\nIMPORTANT: end your answer with your confidence in exactly this form: "
                               "<<CONFIDENCE=N>>, N an integer from 0 to 100, and write nothing after it.")
    entry: str = "[Expert {expert} Round {round}]: {answer}"
    start: str = "[Debate Start]"
    end: str = "[Debate End]"

    def __post_init__(self) -> None:
        debater = {"prompt", "transcript", "expert"}
        needs = {"first_round": ({"prompt"}, {"prompt", "confidence"}),  # (required, allowed) fields
                 "next_round": (debater, debater | {"confidence"}),
                 "force_decode": (set(), debater),
                 "entry": ({"answer"}, {"expert", "round", "answer"})}
        for name, (required, allowed) in needs.items():
            found = _fields(getattr(self, name))
            if not required <= found or not found <= allowed:
                raise SettingError(
                    f"DebatePrompts.{name} must contain {_braced(required)} and may use only "
                    f"{_braced(allowed)}; it has {_braced(found)} (write a literal brace as {{{{ or }}}})"
                )
        if not _fields(self.force_decode) & {"prompt", "transcript"}:
            raise SettingError("DebatePrompts.force_decode must contain {transcript} (the paper) or at least "
                             "{prompt}")

    def transcript(self, entries: Sequence[tuple[str, int, str]]) -> str:
        """The transcript H from (expert, round, answer) entries in the order they were spoken."""
        body = [self.entry.format(expert=e, round=r, answer=a) for e, r, a in entries]
        return "\n".join([self.start, *body, self.end])


@dataclass(frozen=True)
class DebateSettings:
    """How the debate of ``mode: debate`` runs.

    Args:
        rounds: R ≥ 1 debate rounds (the paper: 2).
        max_new_tokens: longest answer per teacher per round.
        temperature: the teachers' sampling temperature in the debate (the paper: 0.7).
        confidence: where c_k comes from: "tag" (the last ``<<CONFIDENCE=N>>`` of its last round; any
            missing tag in a row → uniform weights, the paper), "tag_or_logprob" (a row missing a tag
            uses 100·exp(mean log-prob of each teacher's own last answer) for all its teachers) or
            "logprob" (always that; no tag is asked for).
        confidence_temperature: τ of ``softmax(c / 100 / τ)`` (the paper: 1).
        chat_template: wrap the debate prompts and the scoring context in the tokenizer's chat
            template as one user message; None = when the tokenizer has one.
        max_length: the longest sequence (context + completion) a teacher scores; None = each teacher
            model's ``max_position_embeddings`` (no limit for a teacher without a local model). A
            longer context is cut from its start; the completion positions that still do not fit are
            not covered (README.md: alignment).
        prompts: the debate's texts.
    """

    rounds: int = 2
    max_new_tokens: int = 512
    temperature: float = 0.7
    confidence: Literal["tag", "tag_or_logprob", "logprob"] = "tag"
    confidence_temperature: float = 1.0
    chat_template: bool | None = None
    max_length: int | None = None
    prompts: DebatePrompts = field(default_factory=DebatePrompts)

    def __post_init__(self) -> None:
        checks = [("rounds", self.rounds >= 1, "an integer >= 1"),
                  ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
                  ("temperature", self.temperature > 0, "> 0"),
                  ("confidence_temperature", self.confidence_temperature > 0, "> 0"),
                  ("max_length", self.max_length is None or self.max_length >= 2, ">= 2 or null"),
                  ("confidence", self.confidence in ("tag", "tag_or_logprob", "logprob"),
                   "'tag', 'tag_or_logprob' or 'logprob'")]
        for name, ok, what in checks:
            if not ok:
                raise SettingError(f"MADOPDModule.debate.{name}={getattr(self, name)!r} must be {what}")

    @property
    def asks_for_tags(self) -> bool:
        return self.confidence != "logprob"


@dataclass
class DebateResult:
    """One debate per distinct prompt (N of them), K teachers.

    Fields:
        transcripts: N transcripts H.
        asked, answers: [k][n] each teacher's last-round prompt and answer ('' where it gave none).
        confidence_NK: the confidences read off the tags (NaN where missing).
        tokens, seconds: what the debate generated and how long it took.
    """

    transcripts: list[str]
    asked: list[list[str]]
    answers: list[list[str]]
    confidence_NK: Tensor
    tokens: int = 0
    seconds: float = 0.0


def run_debate(
    teachers: Sequence[Teacher], prompts: Sequence[str], settings: DebateSettings, seed: int,
    render: Callable[[str], str] = lambda text: text, count_tokens: Callable[[str], int] = len,
) -> DebateResult:
    """R rounds among ``teachers`` on every prompt: per round one ``generate_text`` call per teacher
    over all prompts, seeded by (``seed``, round, teacher). ``render`` turns a prompt text into what
    the teacher is sent (e.g. a chat template); ``count_tokens`` measures the answers."""
    started, texts = time.perf_counter(), settings.prompts
    ask = texts.confidence_request if settings.asks_for_tags else ""
    labels = LABELS[: len(teachers)]
    entries: list[list[tuple[str, int, str]]] = [[] for _ in prompts]
    asked: list[list[str]] = []
    answers: list[list[str]] = []
    tokens = 0
    for r in range(1, settings.rounds + 1):
        history = [texts.transcript(e) for e in entries]  # what every teacher of round r reads
        asked, answers = [], []
        for k, (teacher, label) in enumerate(zip(teachers, labels)):
            if r == 1:
                asks = [texts.first_round.format(prompt=p, confidence=ask) for p in prompts]
            else:
                asks = [texts.next_round.format(prompt=p, transcript=h, expert=label, confidence=ask)
                        for p, h in zip(prompts, history)]
            sent = [render(a) for a in asks]
            out = teacher.generate_text(sent, max_new_tokens=settings.max_new_tokens,
                                        temperature=settings.temperature, seed=(seed * 101 + r) * 101 + k)
            if len(out) != len(sent):
                raise SettingError(f"{type(teacher).__name__}.generate_text returned {len(out)} answers for "
                                 f"{len(sent)} debate prompts; it must return one list per prompt")
            said = [(o[0] if o else None) or "" for o in out]  # None: the teacher gave no answer
            tokens += sum(count_tokens(s) for s in said)
            asked.append(sent)
            answers.append(said)
        for n in range(len(prompts)):
            entries[n].extend((label, r, answers[k][n].strip()) for k, label in enumerate(labels))
    confidence_NK = torch.tensor([[_nan(last_confidence(said[n])) for said in answers]
                                  for n in range(len(prompts))], dtype=torch.float64)
    confidence_NK = confidence_NK.reshape(len(prompts), len(teachers))
    return DebateResult([texts.transcript(e) for e in entries], asked, answers, confidence_NK, tokens,
                        time.perf_counter() - started)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


@torch.no_grad()
def answer_confidence(
    teacher: Teacher, tokenizer, asked: Sequence[str], answers: Sequence[str],  # noqa: ANN001
    device: torch.device | str,
) -> Tensor:
    """``100 · exp(mean log-prob)`` of each answer under the teacher that gave it, after the prompt
    it was given (its own ``score``); NaN for an empty answer. (N,)"""
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    out = torch.full((len(answers),), float("nan"), dtype=torch.float64)
    keep = [n for n, row in enumerate(ids) if row]
    if not keep:
        return out
    records = [{"prompt_ids": tokenizer(asked[n])["input_ids"], "answer": None, "answer_ids": [],
                "row_index": n} for n in keep]
    prompts = collate_prompts(records, tokenizer.pad_token_id)
    T = max(len(ids[n]) for n in keep)
    ids_BT = torch.full((len(keep), T), tokenizer.pad_token_id, dtype=torch.long)
    mask_BT = torch.zeros((len(keep), T), dtype=torch.bool)
    for i, n in enumerate(keep):
        ids_BT[i, : len(ids[n])], mask_BT[i, : len(ids[n])] = torch.tensor(ids[n]), True
    batch = RolloutBatch(
        prompt_ids_BP=prompts.prompt_ids_BP.to(device), prompt_mask_BP=prompts.prompt_mask_BP.to(device),
        completion_ids_BT=ids_BT.to(device), completion_mask_BT=mask_BT.to(device), sampler_logp_BT=None,
        answers=[None] * len(keep), row_index_B=prompts.row_index_B, source="teacher",
    )
    logp_BT = teacher_token_logp(batch, teacher.score(batch)).double().cpu()
    mean_B = torch.where(mask_BT, logp_BT, 0.0).sum(-1) / mask_BT.sum(-1)
    out[keep] = 100.0 * mean_B.exp()
    return out


def forced_batch(
    batch: RolloutBatch, context_ids: Sequence[Sequence[int]], pad_id: int, max_length: int | None,
) -> tuple[RolloutBatch, Tensor, Tensor]:
    """The student's exact completions after each row's debate context, how many completion positions
    the teacher covers (B,) and whether the row's context was cut (B,). With ``max_length`` a context
    is cut from its start so that context + completion fits (keeping at least one context token);
    completion tokens that still do not fit are left out (masked) and not covered."""
    lengths_B = batch.completion_mask_BT.sum(-1).tolist()
    kept, covered, cut = [], [], []
    for ctx, n in zip(context_ids, lengths_B):
        ctx = list(ctx)
        cut.append(max_length is not None and len(ctx) + n > max_length)
        if cut[-1]:
            ctx = ctx[-max(max_length - n, 1):]  # keep the end: the transcript's last round and the cue
        kept.append(ctx)
        covered.append(n if max_length is None else max(min(n, max_length - len(ctx)), 0))
    covered_B = torch.tensor(covered, dtype=torch.long, device=batch.completion_ids_BT.device)
    T = batch.completion_ids_BT.shape[1]
    in_window_BT = torch.arange(T, device=covered_B.device)[None, :] < covered_B[:, None]
    P = max(len(c) for c in kept)
    prompt_BP = torch.full((len(kept), P), pad_id, dtype=torch.long)
    prompt_mask_BP = torch.zeros((len(kept), P), dtype=torch.long)
    for b, ctx in enumerate(kept):
        prompt_BP[b, P - len(ctx):], prompt_mask_BP[b, P - len(ctx):] = torch.tensor(ctx, dtype=torch.long), 1
    mask_BT = batch.completion_mask_BT & in_window_BT
    device = covered_B.device
    forced = replace(
        batch, prompt_ids_BP=prompt_BP.to(device), prompt_mask_BP=prompt_mask_BP.to(device),
        completion_ids_BT=batch.completion_ids_BT.masked_fill(~mask_BT, pad_id), completion_mask_BT=mask_BT,
        loss_mask_BT=batch.loss_mask_BT & in_window_BT, sampler_logp_BT=None,
    )
    return forced, covered_B, torch.tensor(cut, device=covered_B.device)
