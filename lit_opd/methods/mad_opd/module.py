"""MADOPDModule: on-policy distillation from a group of teachers.

Paper: "MAD-OPD: Breaking the Ceiling in On-Policy Distillation via Multi-Agent Debate", arXiv
2605.01347 (official code: chiefovoavicii/MAD-OPD). README.md beside this file gives the equations,
defaults, hand values and logs. Three modes share one loss (:mod:`~lit_opd.methods.mad_opd.weights`):

* ``routed`` (MOPD: a teacher per domain or data set): each row is scored by the teacher its source
  field names (``route_field``, ``routes``).
* ``fixed`` (MT-OPD): every teacher scores every row; ``loss = Σ_k w_k ℓ_k`` with fixed weights.
* ``debate`` (MAD-OPD): the teachers debate each prompt blind (:mod:`~lit_opd.methods.mad_opd.debate`),
  their confidences give per-sample weights, and each teacher scores the student's exact completion
  after the prompt and the transcript.

Run: ``python -m lit_opd fit --config configs/mad_opd/debate.yaml`` (or routed.yaml, fixed.yaml).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_opd.errors import SettingError
from lit_opd.methods.base import default_optimizer
from lit_opd.methods.mad_opd.debate import LABELS, DebateSettings, answer_confidence, forced_batch, run_debate
from lit_opd.methods.mad_opd.weights import (
    confidence_weights, covered_mask, fixed_weights, masked_row_mean, mix, reduce_samples, sample_divergences,
    top1_agreement,
)
from lit_opd.methods.opd import OPDModule
from lit_opd.models import ModelSpec, check_tokenizers_compatible, completion_logits
from lit_opd.objectives import divergences as D
from lit_opd.objectives.components import Divergence
from lit_opd.objectives.paths import teacher_token_logp
from lit_opd.rollout.datamodule import step_seed
from lit_opd.rollout.prompts import PromptTokenizer
from lit_opd.teachers.base import Teacher, check_capability
from lit_opd.teachers.group import TeacherGroup, check_routes
from lit_opd.types import RolloutBatch, TeacherOutput

MODES = ("routed", "fixed", "debate")


@dataclass
class Judged:
    """The teachers' judgement of one batch: one entry per scored teacher (for ``routed``, the one
    stitched output), its covered positions per row (None = all), weights (B, K) and logs."""

    names: list[str]
    outputs: list[TeacherOutput]
    covered: list[Tensor | None]
    weights_BK: Tensor
    route: list[str] | None = None
    metrics: dict = field(default_factory=dict)


class MADOPDModule(OPDModule):
    """On-policy distillation from K teachers: routed, fixed-weight or debate-weighted.

    Args:
        student, tokenizer, optimizer, scheduler: see :class:`~lit_opd.methods.base.PolicyModule`.
        teachers: name → teacher (any mix of sizes; every one must score tokens in the student's
            vocabulary), or a :class:`~lit_opd.teachers.TeacherGroup`.
        mode: "routed", "fixed" or "debate" (module docstring).
        objective: the divergence D and its settings (``kind`` jsd with β, reverse_kl, ...; ``top_k``;
            ``temperature``); ``reduction`` reduces over the kept samples: "seq_mean" (the paper),
            "token_mean" (samples weighted by their token count) or "sum".
        route_field, routes: ``routed`` only: the row field naming each row's teacher and the map
            from its values to teacher names (None = the values are teacher names).
        weights: ``fixed`` only: name → weight (normalised; None = uniform).
        debate: ``debate`` only: rounds, lengths, confidence source, texts (:class:`DebateSettings`).
        divide_by_sampling_temperature: divide both models' logits by the rollout's sampling
            temperature inside D (the official code does so with one teacher, not in its debate).
        lmbda, seed, allow_teacher_change, allow_settings_change: see :class:`OPDModule`; ``seed``
            also seeds the debate.
    """

    _template_kwargs: dict = {}  # the datamodule's chat_template_kwargs (connect_prompts); never mutated

    def __init__(
        self,
        student: ModelSpec | str | nn.Module,
        teachers: TeacherGroup | dict[str, Teacher],
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        mode: Literal["routed", "fixed", "debate"] = "debate",
        objective: Divergence = lazy_instance(Divergence, reduction="seq_mean"),
        route_field: str | None = None,
        routes: dict[str, str] | None = None,
        weights: dict[str, float] | None = None,
        debate: DebateSettings = DebateSettings(),
        divide_by_sampling_temperature: bool = False,
        lmbda: float = 1.0,
        seed: int = 0,
        allow_teacher_change: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        allow_settings_change: bool = False,
    ) -> None:
        group = teachers if isinstance(teachers, TeacherGroup) else TeacherGroup(teachers)
        _check_settings(mode, group, objective, route_field, routes, weights, debate,
                        divide_by_sampling_temperature)
        # save_hyperparameters reads this frame's arguments and deep-copies them: record the teachers'
        # names and the debate settings as plain values, never the teachers' models.
        debate_settings, teachers, debate = debate, group.names, asdict(debate)
        # Members are checked against the student one by one below, so an error names the teacher.
        shared, group.tokenizer = group.tokenizer, None
        super().__init__(student, group, tokenizer, objective=objective, lmbda=lmbda, seed=seed,
                         allow_teacher_change=allow_teacher_change, optimizer=optimizer, scheduler=scheduler,
                         allow_settings_change=allow_settings_change)
        group.tokenizer = shared
        for name, member in group.teachers.items():
            if member.tokenizer is not None:
                check_tokenizers_compatible(self.tokenizer, member.tokenizer, f"teacher {name!r}")
        self.mode, self.debate = mode, debate_settings
        self.route_field = route_field or group.route_field
        self.routes = check_routes(routes, group.names, "MADOPDModule") if route_field else group.routes
        self.fixed = fixed_weights(weights, group.names, "MADOPDModule") if mode == "fixed" else None
        self.divide_by_sampling_temperature = divide_by_sampling_temperature

    @property
    def group(self) -> TeacherGroup:
        return self.teacher

    def settings(self) -> dict:
        """The method's settings beyond the objective, for checkpoints."""
        return {"mode": self.mode, "route_field": self.route_field, "routes": self.routes,
                "weights": self.fixed, "debate": asdict(self.debate) if self.mode == "debate" else None,
                "divide_by_sampling_temperature": self.divide_by_sampling_temperature}

    # ----- the step -------------------------------------------------------------------------
    def compute_loss(self, batch: RolloutBatch) -> tuple[Tensor, dict]:
        loss, metrics = self.mad_loss(batch)
        metrics.update(self.rollout_metrics(batch))
        return loss, metrics

    def mad_loss(self, batch: RolloutBatch) -> tuple[Tensor, dict]:
        """The loss on one RolloutBatch (the teachers are asked here) and detached diagnostics."""
        judged = self.judge(batch)
        logits_BTV = completion_logits(self.student, batch)
        temperature = self.divergence_temperature()
        ells, valids, covers = [], [], []
        for out, covered_B in zip(judged.outputs, judged.covered):
            cover_BT = covered_mask(batch.loss_mask_BT, covered_B)
            if out.answered_B is not None:  # a failed teacher covers nothing: its weight becomes 0
                cover_BT = cover_BT & out.answered_B.to(cover_BT.device).bool()[:, None]
            ells.append(sample_divergences(logits_BTV, out, cover_BT, self.objective, temperature))
            valids.append(cover_BT.any(-1))
            covers.append(cover_BT)
        weights_BK = judged.weights_BK.to(logits_BTV.device)
        loss_B, wbar_BK = mix(torch.stack(ells, -1), weights_BK, torch.stack(valids, -1))
        loss, kept_B = reduce_samples(loss_B, batch.loss_mask_BT.sum(-1), self.objective.reduction)
        with torch.no_grad():
            metrics = self._diagnostics(batch, judged, logits_BTV.detach(), covers, ells, wbar_BK, loss_B,
                                        kept_B)
            # tokens some teacher covered: 0 when every teacher failed (the HealthGuard skips the update)
            metrics["supervised_tokens"] = torch.stack(covers).any(0).sum().float()
        return loss, metrics

    def divergence_temperature(self) -> float:
        """τ inside D: the objective's, or the rollout's sampling temperature when asked for."""
        if not self.divide_by_sampling_temperature:
            return self.objective.temperature
        sampling = getattr(getattr(self._trainer, "datamodule", None), "sampling", None)
        if sampling is None:
            raise SettingError("MADOPDModule.divide_by_sampling_temperature needs a RolloutDataModule (its "
                             "sampling.temperature); train with one or set the flag to false")
        return sampling.temperature

    # ----- asking the teachers ----------------------------------------------------------------
    def judge(self, batch: RolloutBatch) -> Judged:
        B = batch.completion_ids_BT.shape[0]
        if self.mode == "routed":
            route = self.group.route(batch.rows, self.route_field, self.routes)
            return Judged(["routed"], [self.group.score_rows(batch, route)], [None], torch.ones(B, 1), route)
        if self.mode == "fixed":
            outs = self.group.score_each(batch)
            w_BK = torch.tensor([self.fixed[n] for n in outs]).expand(B, -1)
            return Judged(list(outs), list(outs.values()), [None] * len(outs), w_BK)
        return self.debate_judge(batch)

    def debate_judge(self, batch: RolloutBatch) -> Judged:
        """A blind debate per distinct prompt of the batch, then each teacher's scores of the student's
        completion after its context (prompt, transcript, cue)."""
        texts = self.prompt_texts(batch)
        position = {text: n for n, text in enumerate(dict.fromkeys(texts))}
        distinct, index_B = list(position), torch.tensor([position[t] for t in texts])
        members = list(self.group.teachers.values())
        result = run_debate(members, distinct, self.debate, self.debate_seed(), self._render,
                            self._count_tokens)
        tags_NK = result.confidence_NK
        weights_NK = confidence_weights(self._confidences(result), self.debate.confidence_temperature)
        outputs, covered, cut = [], [], []
        for k, (name, teacher) in enumerate(self.group.teachers.items()):
            contexts = [self._context_ids(self.debate.prompts.force_decode.format(
                prompt=p, transcript=result.transcripts[n], expert=LABELS[k]))
                for n, p in enumerate(distinct)]
            forced, covered_B, cut_B = forced_batch(batch, [contexts[n] for n in index_B.tolist()],
                                                    self.tokenizer.pad_token_id, self.max_length_of(teacher))
            with torch.no_grad():
                outputs.append(teacher.score(forced))
            covered.append(covered_B)
            cut.append(cut_B)
        metrics = {"debate/tokens": float(result.tokens), "debate/seconds": result.seconds,
                   "debate/prompts": float(len(distinct)),
                   "context_cut_frac": torch.stack(cut).float().mean()}
        if self.debate.asks_for_tags:
            metrics["missing_tag_frac"] = tags_NK.isnan().any(-1)[index_B].float().mean()
        return Judged(list(self.group.names), outputs, covered, weights_NK[index_B], metrics=metrics)

    def prompt_texts(self, batch: RolloutBatch) -> list[str]:
        """Each row's task prompt as the debate reads it: the source row's ``prompt``, its messages
        (one per line, ``role: content``), or the decoded prompt tokens."""
        texts = []
        for b in range(batch.prompt_ids_BP.shape[0]):
            row = batch.rows[b] if batch.rows else {}
            if isinstance(row.get("prompt"), str):
                texts.append(row["prompt"])
            elif row.get("messages"):
                messages = row["messages"]
                texts.append(messages[0]["content"] if len(messages) == 1 else
                             "\n".join(f"{m['role']}: {m['content']}" for m in messages))
            else:
                ids = batch.prompt_ids_BP[b][batch.prompt_mask_BP[b].bool()]
                texts.append(self.tokenizer.decode(ids.tolist(), skip_special_tokens=True))
        return texts

    def debate_seed(self) -> int:
        """The debate's sampling seed for this step: fixed by (seed, global step, rank), so a resumed
        run's debates repeat the unbroken run's."""
        return step_seed(self.seed, self.global_step, self.global_rank)

    def _confidences(self, result) -> Tensor:  # noqa: ANN001 - a DebateResult
        """c (N, K): the tags, or where the settings say so each teacher's own answer likelihood."""
        conf_NK = result.confidence_NK.clone()
        if self.debate.confidence == "tag":
            return conf_NK
        need = conf_NK.isnan().any(-1) if self.debate.confidence == "tag_or_logprob" else torch.ones(
            conf_NK.shape[0], dtype=torch.bool)
        rows = need.nonzero().squeeze(-1).tolist()
        for k, teacher in enumerate(self.group.teachers.values()):
            if rows:  # one row's teachers all use the same scale: every c of a fallback row is replaced
                conf_NK[rows, k] = answer_confidence(
                    teacher, teacher.tokenizer or self.tokenizer, [result.asked[k][n] for n in rows],
                    [result.answers[k][n] for n in rows], self.device)
        return conf_NK

    def _use_chat(self) -> bool:
        chat = self.debate.chat_template
        return getattr(self.tokenizer, "chat_template", None) is not None if chat is None else chat

    def connect_prompts(self, encoder: PromptTokenizer, train_rows: list[dict], val_rows: list[dict]) -> None:
        # The debate's own prompts render with the datamodule's template variables (enable_thinking, ...).
        self._template_kwargs = encoder.template_kwargs

    def _render(self, text: str, tokenize: bool = False) -> str | list[int]:
        if not self._use_chat():
            return self.tokenizer(text)["input_ids"] if tokenize else text
        encoded = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True, tokenize=tokenize,
                                                     **self._template_kwargs)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded) if tokenize else encoded

    def _context_ids(self, text: str) -> list[int]:
        return self._render(text, tokenize=True)

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def max_length_of(self, teacher: Teacher) -> int | None:
        """The longest context + completion ``teacher`` scores (``debate.max_length``, else its model's
        ``max_position_embeddings``, else no limit)."""
        if self.debate.max_length is not None:
            return self.debate.max_length
        model = teacher.generator()
        return getattr(getattr(model, "config", None), "max_position_embeddings", None)

    # ----- logs -------------------------------------------------------------------------------
    def _diagnostics(self, batch: RolloutBatch, judged: Judged, logits_BTV: Tensor, covers: list[Tensor],
                     ells: list[Tensor], wbar_BK: Tensor, loss_B: Tensor, kept_B: Tensor) -> dict:
        student_logp_BT = D.token_logprobs(logits_BTV, batch.completion_ids_BT)
        metrics = dict(judged.metrics)
        metrics["skipped_frac"] = 1.0 - kept_B.float().mean()
        metrics["entropy"] = D.reduce_masked(D.entropy(logits_BTV), batch.loss_mask_BT)
        lengths_B = batch.loss_mask_BT.sum(-1).clamp(min=1)
        kl_BK = torch.zeros_like(wbar_BK)
        for k, (name, out, cover_BT) in enumerate(zip(judged.names, judged.outputs, covers)):
            if out.logits_BTV is not None or out.token_logp_BT is not None:
                kl_BK[:, k] = masked_row_mean(student_logp_BT - teacher_token_logp(batch, out), cover_BT)
            if self.mode == "routed":
                metrics["top1_agreement"] = top1_agreement(logits_BTV, out, cover_BT)
                continue
            valid_B = cover_BT.any(-1)
            metrics[f"div/{name}"] = ells[k].detach()[valid_B].mean() if valid_B.any() else 0.0
            metrics[f"teacher_kl/{name}"] = kl_BK[valid_B, k].mean() if valid_B.any() else 0.0
            metrics[f"coverage/{name}"] = (cover_BT.sum(-1) / lengths_B).mean()
            metrics[f"weight/{name}"] = wbar_BK[:, k].mean()
            metrics[f"top1/{name}"] = top1_agreement(logits_BTV, out, cover_BT)
        kl_B = (wbar_BK * kl_BK).sum(-1)
        metrics["teacher_kl"] = kl_B.mean()
        if self.mode == "routed":
            values = [str(row[self.route_field]) for row in batch.rows]
            for value in dict.fromkeys(values):
                rows_B = torch.tensor([v == value for v in values], device=loss_B.device)
                metrics[f"loss/{value}"] = loss_B[rows_B].mean()
                metrics[f"teacher_kl/{value}"] = kl_B[rows_B].mean()
        answered = [o.answered_B for o in judged.outputs if o.answered_B is not None]
        if answered:
            metrics["teacher_missing_frac"] = 1.0 - torch.cat(answered).float().mean()
        return metrics

    # ----- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # teacher identities (by name), objective, stats
        checkpoint["lit_opd"]["mad_opd"] = self.settings()

    def teacher_change_message(self, saved: dict, current: dict) -> str:
        """Names the group members that differ, not the whole group's identity."""
        names = sorted(set(saved) | set(current)) if isinstance(saved, dict) else sorted(current)
        changed = {n: {"saved": saved.get(n), "now": current.get(n)}
                   for n in names if saved.get(n) != current.get(n)}
        return (
            f"This checkpoint was trained with other teachers: {changed}. Resume with the same teachers "
            "(names included), or set allow_teacher_change: true to continue with the new ones on purpose."
        )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # student, teacher stats, the teacher check above
        info = checkpoint.get("lit_opd", {})
        if info.get("mad_opd") not in (None, self.settings()):
            rank_zero_warn(f"MADOPDModule: resuming with other settings ({info['mad_opd']} -> "
                           f"{self.settings()})")


def _check_settings(
    mode: str, group: TeacherGroup, objective: Divergence, route_field: str | None, routes: dict | None,
    weights: dict | None, debate: DebateSettings, by_sampling: bool,
) -> None:
    """One clear error per bad setting, before any model is loaded."""
    if mode not in MODES:
        raise SettingError(f"MADOPDModule.mode={mode!r}: use one of {list(MODES)}")
    if not isinstance(objective, Divergence):
        raise SettingError(f"MADOPDModule.objective must be a lit_opd.objectives.Divergence (D of each "
                         f"teacher's loss), got {type(objective).__name__}")
    settings = objective.settings()  # a method call: builds a lazy YAML default before its fields are read
    if settings["chunk_size"] is not None:
        raise SettingError("MADOPDModule computes each sample's divergence from full logits; set "
                         "objective.chunk_size: null")
    if by_sampling and settings["temperature"] != 1.0:
        raise SettingError("MADOPDModule: objective.temperature and divide_by_sampling_temperature both set "
                         "τ; keep one (objective.temperature: 1.0, or the flag false)")
    for name, member in group.teachers.items():
        check_capability(member, objective.needs(), "MADOPDModule",
                         f"objective=Divergence (teacher {name!r})")
    misplaced = {"routed": {"weights": weights}, "fixed": {"route_field": route_field, "routes": routes},
                 "debate": {"route_field": route_field, "routes": routes, "weights": weights}}[mode]
    for setting, value in misplaced.items():
        if value is not None:
            owner = "fixed" if setting == "weights" else "routed"
            raise SettingError(f"MADOPDModule.{setting} is a setting of mode {owner}, but mode is {mode!r}; "
                             "remove it")
    if mode == "routed":
        if route_field and group.route_field:
            raise SettingError("MADOPDModule.route_field is set and so is the TeacherGroup's; set it in one "
                             "place")
        if not (route_field or group.route_field):
            raise SettingError("MADOPDModule mode routed needs route_field: the row field that names each "
                             "row's teacher (e.g. domain), with routes mapping its values to teacher names")
        return
    if len(group) < 2:
        raise SettingError(f"MADOPDModule mode {mode} needs at least 2 teachers, got {group.names}; with one "
                         "teacher use OPDModule")
    if mode == "debate":
        _check_debaters(group, debate)


def _check_debaters(group: TeacherGroup, debate: DebateSettings) -> None:
    if len(group) > len(LABELS):
        raise SettingError(f"MADOPDModule debate: at most {len(LABELS)} teachers (Expert A..Z), "
                         f"got {len(group)}")
    for name, member in group.teachers.items():
        if not member.generates_text():
            raise SettingError(f"MADOPDModule mode debate: teacher {name!r} ({type(member).__name__}) "
                             "cannot generate text for the debate; use a teacher with generate_text (e.g. "
                             "HFTeacher)")
    if not isinstance(debate, DebateSettings):
        raise SettingError(f"MADOPDModule.debate must be DebateSettings, got {type(debate).__name__}")
