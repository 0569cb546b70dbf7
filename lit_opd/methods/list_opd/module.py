"""ListOPDModule: G-OPD below the extrapolation cliff, with a base-relative clip (ListOPD).

Paper: "The Extrapolation Cliff in On-Policy Distillation of Near-Deterministic Structured Outputs",
arXiv 2605.08737 (https://lixin.ai/ListOPD). Only its abstract was available; the recipe here is our
reading of it (README.md beside this file says which parts are inferred), built on G-OPD
(arXiv 2602.12125). The loss is :class:`~lit_opd.methods.list_opd.objective.BaseRelativeClip`:
the G-OPD advantage under a PPO clip of strength c measured against the warm start π_ref.

λ: a number, or "auto" = λ* − δ, where λ* comes from ``lambda_star`` or is calibrated when fit
starts (:mod:`lit_opd.methods.list_opd.calibration`: teacher-forced reference answers, p and b at
the structural positions, median over prompts). A λ above λ* is refused unless ``allow_above_cliff``.

Logs (``train/`` per step on the rollouts, ``val/`` per validation epoch on greedy completions):
``parse_valid`` (strict contract), ``ndcg@1`` (on parsed outputs; needs rows with ``candidates``
and ``relevance``), ``clip_frac`` / ``clip_frac_lower``; per step also ``tail_ratio`` (median and
``tail_ratio_min`` over the calibration prompts of (1 − Q_C)/(1 − b) at each prompt's binding
position: the student's current mass outside the contract-valid class, teacher-forced on the
calibration batch, where positions are exact; it must stay ≥ 1 − c to be clip-safe). At fit start
``listopd/{lambda_star,lambda,p,b,binding_position}`` and the calibration table.

Run: ``python -m lit_opd fit --config configs/list_opd/train.yaml``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric
from transformers import PreTrainedTokenizerBase

from lit_opd.errors import SettingError
from lit_opd.methods.base import default_optimizer
from lit_opd.methods.list_opd.calibration import (
    CalibrationBatch, CalibrationReport, RankingContract, binding_tail_ratios, build_batches, calibrate_batches,
    encode_rows,
)
from lit_opd.methods.list_opd.objective import BaseRelativeClip
from lit_opd.tasks.ranking import RankingTask, parse_ranking
from lit_opd.methods.opd import OPDModule
from lit_opd.models import ModelSpec
from lit_opd.rollout.prompts import PromptTokenizer, decode_completions
from lit_opd.rollout.sources import PromptSource
from lit_opd.teachers.base import Teacher
from lit_opd.types import RolloutBatch


@functools.lru_cache(maxsize=None)
def _task(k: int) -> RankingTask:
    return RankingTask(k=k)


def ranking_score(text: str, row: Mapping | None, answer: str | None) -> tuple[bool | None, float | None]:
    """(parse-valid, NDCG@1): ``RankingTask.score`` when ``row`` has ``candidates`` and ``relevance``;
    else validity against the reference answer's ids (NDCG None); (None, None) with neither."""
    if row is not None and "candidates" in row and "relevance" in row:
        score = _task(max(2, len(row["candidates"]))).score(text, row)
        return bool(score["valid"]), score["ndcg@1"]
    if answer is None:
        return None, None
    contract = RankingContract.from_answer(answer)
    return parse_ranking(text, sorted(contract.candidates), contract.k) is not None, None


class ListOPDModule(OPDModule):
    """G-OPD with reward extrapolation λ kept below the calibrated cliff λ*, and a PPO clip of
    strength c measured against the warm start (README.md beside this module).

    Args:
        student, teacher, tokenizer, optimizer, scheduler, reference, allow_teacher_change,
        allow_settings_change: see
            :class:`OPDModule` (the reference defaults to the student's initial weights: the warm
            start). Calibration needs a teacher with a ``scoring_model()`` (every local teacher).
        objective: the base-relative clip (``clip`` c, ``kl_coef``, ``dual_clip``, ``tis_cap``,
            ``reweight_to_base``, ``reduction``); λ is set by this module.
        lambda_: the extrapolation λ, or "auto" = λ* − ``delta``.
        lambda_star: a precomputed λ* (e.g. from ``python -m lit_opd calibrate``); it wins over the
            one calibrated at fit start (which then only feeds the tail-ratio log).
        delta: margin below λ* for ``lambda_="auto"``.
        allow_above_cliff: run with a λ above λ* on purpose (e.g. to locate the cliff).
        anchor: clip anchor of λ*: "base" (the warm start, this module's clip) or "teacher".
        two_sided_cliff: also count positions where the teacher is less certain than the warm start
            (p < b): there λ > 1 pushes the tail above the warm start's, and λ* is where it leaves
            the band's upper edge (:mod:`lit_opd.methods.list_opd.cliff`). Off: only p > b counts.
        calibration_source: rows (prompt + answer) to calibrate on; None = the datamodule's
            validation rows, else its training rows. Encoded with the datamodule's prompt settings.
        calibration_rows: how many rows to calibrate on (0 = no calibration: needs ``lambda_star``
            for "auto", and no tail-ratio log).
    """

    def __init__(
        self, student: ModelSpec | str | nn.Module, teacher: Teacher,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        objective: BaseRelativeClip = lazy_instance(BaseRelativeClip),
        lambda_: float | Literal["auto"] = "auto", lambda_star: float | None = None, delta: float = 0.02,
        allow_above_cliff: bool = False, anchor: Literal["base", "teacher"] = "base",
        two_sided_cliff: bool = False,
        calibration_source: PromptSource | None = None, calibration_rows: int = 32,
        reference: ModelSpec | str | None = None, allow_teacher_change: bool = False,
        optimizer: OptimizerCallable = default_optimizer, scheduler: LRSchedulerCallable | None = None,
        allow_settings_change: bool = False,
    ) -> None:
        _check_settings(objective, lambda_, delta, calibration_rows, anchor)
        super().__init__(
            student, teacher, tokenizer, objective=objective, reference=reference,
            allow_teacher_change=allow_teacher_change, optimizer=optimizer, scheduler=scheduler,
            allow_settings_change=allow_settings_change,
        )
        self.lambda_setting = lambda_
        self.lambda_ = None if lambda_ == "auto" else float(lambda_)
        self.delta, self.allow_above_cliff, self.anchor = delta, allow_above_cliff, anchor
        self.two_sided_cliff = two_sided_cliff
        self.calibration_source, self.calibration_rows = calibration_source, calibration_rows
        self.given_lambda_star = lambda_star
        self.lambda_star: float | None = None
        self.calibration: CalibrationReport | None = None
        self._calibration_batches: list[CalibrationBatch] = []
        self._prompts: tuple[PromptTokenizer, list[dict], list[dict]] | None = None
        self.val_parse_valid, self.val_ndcg = MeanMetric(), MeanMetric()
        if lambda_star is not None:
            self.set_lambda_star(lambda_star)

    @property
    def lambda_(self) -> float | None:
        """λ, held by the objective (None until "auto" is resolved)."""
        return self.objective.lambda_

    @lambda_.setter
    def lambda_(self, value: float | None) -> None:
        self.objective.lambda_ = value

    @property
    def c(self) -> float:
        """The clip strength c of the objective (λ* depends on it)."""
        return self.objective.clip

    # ----- λ and the cliff --------------------------------------------------------------------
    def set_lambda_star(self, value: float) -> float:
        """Record λ* and resolve λ: "auto" → λ* − δ; a number above λ* is refused unless
        ``allow_above_cliff``. Returns λ."""
        self.lambda_star = float(value)
        if self.lambda_setting == "auto":
            if not math.isfinite(value):
                raise SettingError(
                    "ListOPDModule.lambda_='auto' but λ* = +inf: the teacher puts no more mass on "
                    "contract-valid tokens than the warm start at any structural position, so there is no "
                    "cliff to stay below. Set lambda_ to a number."
                )
            if value - self.delta <= 0:
                raise SettingError(f"ListOPDModule: λ* = {value:.4f} leaves no room for delta={self.delta}; "
                                 "lower delta or set lambda_ to a number")
            self.lambda_ = value - self.delta
        elif self.lambda_ > value and not self.allow_above_cliff:
            raise SettingError(
                f"ListOPDModule.lambda_={self.lambda_} is above the extrapolation cliff λ* = {value:.4f} "
                f"(clip c={self.c}, anchor {self.anchor!r}{self._binding_note()}): past λ* the G-OPD "
                "fixed point leaves the clip-safe region and strict parse validity collapses (arXiv "
                f"2605.08737). Use lambda_: auto (λ* − δ = {value - self.delta:.4f}) or a value ≤ λ*, or "
                "set allow_above_cliff: true to run above the cliff on purpose."
            )
        return self.lambda_

    def _binding_note(self) -> str:
        r = self.calibration
        if r is None or r.binding_position is None:
            return ""
        return f"; binding position {r.binding_position}, p={r.p:.6f}, b={r.b:.6f}"

    def calibrate(self, records: Sequence[Mapping]) -> CalibrationReport:
        """Calibrate λ* on encoded records (``prompt_ids``, ``answer``, ``answer_ids``) with the teacher's
        ``scoring_model()`` (the distribution ``score`` returns, temperature included) and the frozen
        warm start; keeps the batch for the tail-ratio log and resolves λ unless a ``lambda_star``
        was given."""
        model = self.teacher.scoring_model()
        if model is None:
            raise SettingError(
                f"ListOPDModule calibration needs a teacher with a local model (HFTeacher), got "
                f"{type(self.teacher).__name__}; pass lambda_star and calibration_rows: 0 instead"
            )
        batches = build_batches(self.tokenizer, list(records)[: self.calibration_rows])
        self._calibration_batches = [b.to(self.device) for b in batches]
        self.calibration = calibrate_batches(model, self.reference, self.tokenizer, self._calibration_batches,
                                             self.c, self.anchor, self.two_sided_cliff)
        if self.given_lambda_star is None:
            self.set_lambda_star(self._rank_zero_value(self.calibration.lambda_star))
        return self.calibration

    def _rank_zero_value(self, value: float) -> float:
        """Every rank uses rank 0's λ* (calibration is deterministic, but not bitwise across GPUs)."""
        try:
            return self.trainer.strategy.broadcast(value, src=0)
        except RuntimeError:  # not attached to a Trainer
            return value

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.calibration_rows > 0:
            report = self.calibrate(self._calibration_records())
            rank_zero_info(f"ListOPD calibration on {report.num_prompts} prompts (c={self.c}):\n"
                           f"{report.table()}\n{report.summary()}\nlambda {self.lambda_:.6g}")
        if self.lambda_ is None:
            raise SettingError("ListOPDModule.lambda_='auto' needs λ*: set calibration_rows > 0 or lambda_star")
        if self.lambda_star is None:
            rank_zero_warn(f"ListOPDModule: λ={self.lambda_} is not checked against the cliff (no λ*)")
        elif self.lambda_star < 1.0:
            rank_zero_warn(
                f"ListOPDModule: λ* = {self.lambda_star:.4f} < 1, so λ = {self.lambda_:.4f} interpolates "
                "toward the warm start: the teacher's tail at the binding position is thinner than (1 − c) "
                "times the warm start's, and even standard OPD (λ = 1) leaves the clip band. Warm-start the "
                "student longer (until b approaches p) for the λ* > 1 regime of the paper."
            )
        self._log_calibration()

    def connect_prompts(self, encoder: PromptTokenizer, train_rows: list[dict], val_rows: list[dict]) -> None:
        """The datamodule's prompt encoder and rows: what calibration encodes and falls back on."""
        self._prompts = (encoder, train_rows, val_rows)

    def _calibration_records(self) -> list[dict]:
        encoder, train_rows, val_rows = self._prompts or (None, [], [])
        if self.calibration_source is not None:
            rows = self.calibration_source.load()[: self.calibration_rows]
            return encoder.rows(rows, "calibration") if encoder else encode_rows(self.tokenizer, rows)
        records = [r for r in (val_rows or train_rows) if r.get("answer") is not None]
        if not records:
            raise SettingError(
                "ListOPDModule cannot calibrate: no calibration_source and the datamodule has no rows with "
                "answers; pass calibration_source, or lambda_star with calibration_rows: 0"
            )
        return records[: self.calibration_rows]

    def _log_calibration(self) -> None:
        r = self.calibration
        metrics = {"listopd/lambda": self.lambda_}
        if self.lambda_star is not None:
            metrics["listopd/lambda_star"] = self.lambda_star
        if r is not None and r.binding_position is not None:
            metrics.update({"listopd/p": r.p, "listopd/b": r.b})
            metrics["listopd/binding_position"] = r.binding_position
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)

    # ----- contract metrics -------------------------------------------------------------------
    def rollout_metrics(self, batch: RolloutBatch) -> dict[str, torch.Tensor | float]:
        valid, ndcg = self.ranking_scores(batch)
        out: dict[str, torch.Tensor | float] = {"lambda": self.lambda_}
        if valid:
            out["parse_valid"] = sum(valid) / len(valid)
        if ndcg:
            out["ndcg@1"] = sum(ndcg) / len(ndcg)
        if self.calibration is not None and self._calibration_batches:
            ratios = binding_tail_ratios(self.student, self._calibration_batches, self.calibration)
            if ratios.numel():
                out["tail_ratio"], out["tail_ratio_min"] = ratios.median().item(), ratios.min().item()
        return out

    def validation_step(self, batch: RolloutBatch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        valid, ndcg = self.ranking_scores(batch)
        self.val_parse_valid.update(torch.tensor(valid or [0.0], dtype=torch.float32, device=self.device),
                                    weight=float(bool(valid)))
        self.val_ndcg.update(torch.tensor(ndcg or [0.0], device=self.device), weight=float(bool(ndcg)))
        self.log("val/parse_valid", self.val_parse_valid, on_epoch=True, on_step=False, prog_bar=True)
        self.log("val/ndcg@1", self.val_ndcg, on_epoch=True, on_step=False)

    def ranking_scores(self, batch: RolloutBatch) -> tuple[list[float], list[float]]:
        """Per row of ``batch``: parse validity (1/0) and, for parsed rows with metadata, NDCG@1."""
        texts = decode_completions(self.tokenizer, batch.completion_ids_BT, batch.completion_mask_BT)
        valid, ndcg = [], []
        rows = batch.rows or [None] * len(texts)
        for text, row, answer in zip(texts, rows, batch.answers):
            ok, score = ranking_score(text, row, answer)
            if ok is not None:
                valid.append(float(ok))
            if score is not None:
                ndcg.append(score)
        return valid, ndcg


def _check_settings(
    objective: BaseRelativeClip, lambda_: float | str, delta: float, rows: int, anchor: str
) -> None:
    if not isinstance(objective, BaseRelativeClip):
        raise SettingError(f"ListOPDModule.objective must be a BaseRelativeClip (ListOPD's loss), got "
                         f"{objective.component_class().__name__}; use OPDModule for other objectives")
    if lambda_ != "auto" and (isinstance(lambda_, str) or not float(lambda_) > 0):
        raise SettingError(f"ListOPDModule.lambda_={lambda_!r}: use a number > 0 or 'auto'")
    if delta < 0:
        raise SettingError(f"ListOPDModule.delta={delta} must be >= 0")
    if rows < 0:
        raise SettingError(f"ListOPDModule.calibration_rows={rows} must be >= 0")
    if anchor not in ("base", "teacher"):
        raise SettingError(f"ListOPDModule.anchor={anchor!r}: use 'base' or 'teacher'")
