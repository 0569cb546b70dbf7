"""OPDModule: standard on-policy distillation.

The student samples completions (RolloutDataModule), the teacher scores every token, and the
student minimises an objective (a component, chosen in YAML by ``class_path``):

* :class:`~lit_opd.objectives.Divergence` (GKD, Agarwal et al. 2024, arXiv 2306.13649): a
  full-distribution divergence per completion token, averaged over the loss mask,
  ``JSD_β = β KL(T‖M) + (1−β) KL(S‖M)``, ``M = βT + (1−β)S`` (β=0 forward KL, β=1 reverse KL),
  or forward/reverse/skew KL, TVD; optionally on the teacher's top-k support with a tail bucket.
* :class:`~lit_opd.objectives.SampledReward` (Tinker's OPD; G-OPD, arXiv 2602.12125): the
  sampled-token reverse KL as a per-token reward, ``A_t = −κ (log q_samp(y_t) − log p(y_t))``,
  optimised with importance sampling or PPO clipping; ``lambda_ ≠ 1`` extrapolates the reward
  against a reference (the student's initial weights).

GKD's mix: with probability ``lmbda`` a step is on-policy; otherwise its completions are the
dataset answers (or teacher samples with ``seq_kd``). The draw is seeded by the global step, so
every rank makes the same choice and a resumed run repeats it.

Run: ``python -m lit_opd fit --config configs/quickstart.yaml``.
"""

from __future__ import annotations

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_opd.errors import SettingError
from lit_opd.methods.base import default_optimizer
from lit_opd.methods.taught import TaughtModule
from lit_opd.models import ModelSpec, check_tokenizers_compatible, completion_logits
from lit_opd.objectives import divergences as D
from lit_opd.objectives.components import Divergence, Objective
from lit_opd.objectives.paths import answered_only, score_teacher, token_terms
from lit_opd.objectives.sampled import mismatch_kl
from lit_opd.rollout.settings import generator_seed
from lit_opd.teachers.base import Teacher, check_capability
from lit_opd.types import RolloutBatch, TeacherOutput


class OPDModule(TaughtModule):
    """On-policy distillation from one teacher.

    Args:
        student, tokenizer, optimizer, scheduler: see :class:`PolicyModule`.
        teacher: the judge (e.g. ``HFTeacher``); never trained, never checkpointed.
        objective: what the student minimises (``Divergence`` by default: JSD β = 0.5 on full
            logits; ``SampledReward`` for the sampled-token reward and G-OPD). Its settings sit
            under ``objective.init_args`` in YAML.
        lmbda: probability that a step is on-policy (GKD); 1 = always.
        seq_kd: off-policy steps use teacher samples instead of dataset answers.
        seed: seed of the on/off-policy draw.
        reference: π_ref for objectives that use one; None = a frozen copy of the student's
            initial weights.
        allow_teacher_change: resume from a checkpoint made with another teacher.
        allow_settings_change: resume from a checkpoint made with another student spec or objective
            (class or setting); off, such a resume is refused listing the differences.
    """

    def __init__(
        self,
        student: ModelSpec | str | nn.Module,
        teacher: Teacher,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        objective: Objective = lazy_instance(Divergence),
        lmbda: float = 1.0,
        seq_kd: bool = False,
        seed: int = 0,
        reference: ModelSpec | str | None = None,
        allow_teacher_change: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        allow_settings_change: bool = False,
    ) -> None:
        super().__init__(student, teacher, tokenizer, objective, allow_teacher_change, optimizer, scheduler,
                         allow_settings_change=allow_settings_change)
        name = type(self).__name__
        objective_name = objective.component_class().__name__
        check_capability(teacher, objective.needs(), name, f"objective={objective_name}")
        if teacher.tokenizer is not None:
            check_tokenizers_compatible(self.tokenizer, teacher.tokenizer)
        self._check_mix(objective, teacher, lmbda, seq_kd)
        self.lmbda, self.seq_kd, self.seed = lmbda, seq_kd, seed
        if objective.uses_reference():
            self.freeze_reference(reference)

    def _check_mix(self, objective: Objective, teacher: Teacher, lmbda: float, seq_kd: bool) -> None:
        name = type(self).__name__
        if not 0.0 <= lmbda <= 1.0:
            raise SettingError(f"{name}.lmbda={lmbda} must be in [0, 1]")
        if seq_kd and teacher.generator() is None:
            raise SettingError(f"{name}.seq_kd=True needs a teacher that can generate locally (HFTeacher); "
                             f"{type(teacher).__name__} cannot")
        if objective.needs_sampler_logp() and lmbda < 1.0 and not seq_kd:
            raise SettingError(
                f"{name}.lmbda < 1 mixes in dataset completions, which have no sampler log-probs; the "
                f"objective {objective.component_class().__name__} needs them. Use objective Divergence or "
                "lmbda=1."
            )

    # ----- where completions come from ------------------------------------------------------
    def completion_source(self) -> str:
        if self.lmbda >= 1.0:
            return "student"
        draw = torch.Generator().manual_seed(generator_seed(self.seed * 1_000_003 + self.global_step))
        if torch.rand(1, generator=draw).item() <= self.lmbda:
            return "student"
        return "teacher" if self.seq_kd else "dataset"

    def teacher_generator(self) -> nn.Module:
        """The model that samples sequence-level KD's teacher completions."""
        return self.teacher.generator()

    # ----- the step -------------------------------------------------------------------------
    def compute_loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        """The teacher's judgement of the rollout, the objective on it, and the rollout's diagnostics."""
        loss, metrics = self.loss(batch, self.score_teacher(batch))
        metrics.update(self.rollout_metrics(batch))
        return loss, metrics


    def rollout_metrics(self, batch: RolloutBatch) -> dict[str, torch.Tensor | float]:
        """Extra per-step diagnostics of the training rollouts, logged as ``train/<key>`` (none here)."""
        return {}

    def score_teacher(self, batch: RolloutBatch) -> TeacherOutput:
        """The teacher's judgement; hidden states instead of logits when the lean path applies."""
        return score_teacher(self.teacher, self.student, batch, self.objective)

    def loss(self, batch: RolloutBatch, teacher_out: TeacherOutput) -> tuple[torch.Tensor, dict]:
        """The objective on one RolloutBatch, and diagnostics (detached) to log. Rows the teacher gave
        no answer for (a failed remote call) leave the loss mask, counted as ``teacher_missing_frac``;
        ``supervised_tokens`` is what the mask keeps (0: the HealthGuard skips the update)."""
        batch = answered_only(batch, teacher_out)
        terms = token_terms(self.student, batch, teacher_out, self.objective)
        if self.objective.uses_reference():
            terms.reference_logp_BT = self.reference_logp(batch)
        loss, metrics = self.objective(batch, terms, teacher_out)
        with torch.no_grad():
            mask_BT = batch.loss_mask_BT
            metrics["supervised_tokens"] = mask_BT.sum().float()
            metrics["teacher_kl"] = D.reduce_masked(terms.student_logp_BT - terms.teacher_logp_BT, mask_BT)
            metrics["entropy"] = D.reduce_masked(terms.entropy_BT, mask_BT)
            if teacher_out.answered_B is not None:
                metrics["teacher_missing_frac"] = 1.0 - teacher_out.answered_B.float().mean()
            if batch.sampler_logp_BT is not None and batch.source == "student":
                metrics["mismatch_kl"] = mismatch_kl(terms.student_logp_BT, batch.sampler_logp_BT, mask_BT)
        return loss, metrics

    @torch.no_grad()
    def reference_logp(self, batch: RolloutBatch) -> torch.Tensor:
        """log π_ref of the completion tokens: (B, T)."""
        return D.token_logprobs(completion_logits(self.reference, batch), batch.completion_ids_BT)
