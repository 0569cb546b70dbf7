"""OPDModule: standard on-policy distillation.

The student samples completions (RolloutDataModule), the teacher scores every token, and the
student minimises one of two objectives:

* ``loss="divergence"`` (GKD, Agarwal et al. 2024, arXiv 2306.13649): a full-distribution
  divergence per completion token, averaged over valid tokens,
  ``JSD_β = β KL(T‖M) + (1−β) KL(S‖M)``, ``M = βT + (1−β)S`` (β=0 forward KL, β=1 reverse KL),
  or forward/reverse/skew KL, TVD; optionally on the teacher's top-k support with a tail bucket.
* ``loss="sampled"`` (Tinker's OPD; G-OPD, arXiv 2602.12125): the sampled-token reverse KL as a
  per-token reward, ``A_t = −κ (log q_samp(y_t) − log p(y_t))``, optimised with importance
  sampling or PPO clipping; ``lambda_ ≠ 1`` extrapolates the reward against a reference
  (the student's initial weights): ``A_t = κ [λ (log p − log π_ref) − (log q_old − log π_ref)]``.

GKD's mix: with probability ``lmbda`` a step is on-policy; otherwise its completions are the
dataset answers (or teacher samples with ``seq_kd``). The draw is seeded by the global step, so
every rank makes the same choice and a resumed run repeats it.

Run: ``python -m lit_opd fit --config configs/quickstart.yaml``.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_opd.objectives import divergences as D
from lit_opd.objectives import sampled as O
from lit_opd.objectives.lean import completion_hidden, hidden_divergence, plain_head
from lit_opd.methods.base import PolicyModule, default_optimizer
from lit_opd.models import ModelSpec, check_tokenizers_compatible, completion_logits, freeze, load_causal_lm
from lit_opd.teachers.base import Teacher, check_capability
from lit_opd.types import RolloutBatch, TeacherCapability, TeacherOutput


class OPDModule(PolicyModule):
    """On-policy distillation from one teacher.

    Args:
        student, tokenizer, optimizer, scheduler: see :class:`PolicyModule`.
        teacher: the judge (e.g. ``HFTeacher``); never trained, never checkpointed.
        loss: "divergence" (full-distribution, GKD) or "sampled" (token reward, Tinker/G-OPD).
        divergence: for ``loss="divergence"``: "jsd", "forward_kl", "reverse_kl",
            "skew_forward_kl", "skew_reverse_kl" or "tvd".
        beta: JSD interpolation (0 forward KL, 1 reverse KL).
        alpha: skew KL mixing weight.
        temperature: divides both models' logits inside the divergence.
        top_k: compare on the teacher's top-k tokens plus a tail bucket (None = full vocabulary).
        chunk_size: completion tokens per chunk of the memory-lean path (None = all at once). With
            a plain-linear-head student and teacher the loss is then computed from hidden states
            (lit_opd.objectives.lean): no [B, T, V] logits tensor of either model is ever held.
        reduction: "token_mean" (GKD/TRL), "seq_mean" or "sum".
        estimator: for ``loss="sampled"``: "importance_sampling" (Tinker) or "ppo" (verl).
        kl_coef: κ, scale of the reverse-KL reward.
        lambda_: G-OPD reward extrapolation (1 = standard OPD; > 1 ExOPD).
        reference: π_ref for ``lambda_ ≠ 1``; None = a frozen copy of the student's initial weights.
        clip_eps_low, clip_eps_high, dual_clip, tis_cap: PPO clip range, dual clip and truncated
            importance-sampling cap (``estimator="ppo"``).
        lmbda: probability that a step is on-policy (GKD); 1 = always.
        seq_kd: off-policy steps use teacher samples instead of dataset answers.
        seed: seed of the on/off-policy draw.
        allow_teacher_change: resume from a checkpoint made with another teacher.
    """

    #: Build the frozen reference even at ``lambda_ == 1`` (a subclass whose loss always needs it).
    needs_reference: ClassVar[bool] = False

    def __init__(
        self,
        student: ModelSpec | str | nn.Module,
        teacher: Teacher,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        loss: Literal["divergence", "sampled"] = "divergence",
        divergence: Literal["jsd", "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "tvd"] = "jsd",
        beta: float = 0.5,
        alpha: float = 0.1,
        temperature: float = 1.0,
        top_k: int | None = None,
        chunk_size: int | None = None,
        reduction: Literal["token_mean", "seq_mean", "sum"] = "token_mean",
        estimator: Literal["importance_sampling", "ppo"] = "importance_sampling",
        kl_coef: float = 1.0,
        lambda_: float = 1.0,
        reference: ModelSpec | str | None = None,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = 3.0,
        tis_cap: float = 5.0,
        lmbda: float = 1.0,
        seq_kd: bool = False,
        seed: int = 0,
        allow_teacher_change: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(student, tokenizer, optimizer, scheduler)
        self._check_settings(loss, divergence, beta, alpha, temperature, top_k, lmbda, seq_kd)
        self.teacher = teacher
        needed = TeacherCapability.TOKEN_LOGPROBS if loss == "sampled" else TeacherCapability.FULL_LOGITS
        if loss == "divergence" and top_k is not None:
            needed = TeacherCapability.TOPK_LOGPROBS
        check_capability(teacher, needed, type(self).__name__, f"loss={loss!r}")
        if teacher.tokenizer is not None:
            check_tokenizers_compatible(self.tokenizer, teacher.tokenizer)
        if seq_kd and not hasattr(teacher, "model"):
            raise ValueError("seq_kd=True needs a teacher that can generate locally (HFTeacher)")
        self.loss_mode, self.divergence, self.beta, self.alpha = loss, divergence, beta, alpha
        self.temperature, self.top_k, self.chunk_size, self.reduction = temperature, top_k, chunk_size, reduction
        self.estimator, self.kl_coef, self.lambda_ = estimator, kl_coef, lambda_
        self.clip = dict(eps_low=clip_eps_low, eps_high=clip_eps_high, dual_clip=dual_clip)
        self.tis_cap, self.lmbda, self.seq_kd, self.seed = tis_cap, lmbda, seq_kd, seed
        self.allow_teacher_change = allow_teacher_change
        # Frozen helpers live in a list so they are not registered: never optimised or saved.
        self._frozen: dict[str, nn.Module] = {}
        if loss == "sampled" and (lambda_ != 1.0 or self.needs_reference):
            ref = load_causal_lm(reference) if reference is not None else copy.deepcopy(self.student)
            self._frozen["reference"] = freeze(ref)

    @staticmethod
    def _check_settings(loss, divergence, beta, alpha, temperature, top_k, lmbda, seq_kd) -> None:  # noqa: ANN001
        if loss not in ("divergence", "sampled"):
            raise ValueError(f"OPDModule.loss={loss!r}: use 'divergence' or 'sampled'")
        if divergence not in D.KINDS:
            raise ValueError(f"OPDModule.divergence={divergence!r}: use one of {list(D.KINDS)}")
        for name, value in (("beta", beta), ("alpha", alpha), ("lmbda", lmbda)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"OPDModule.{name}={value} must be in [0, 1]")
        if temperature <= 0:
            raise ValueError(f"OPDModule.temperature={temperature} must be > 0")
        if top_k is not None and top_k < 1:
            raise ValueError(f"OPDModule.top_k={top_k} must be >= 1 or null")
        if loss == "sampled" and lmbda < 1.0 and not seq_kd:
            raise ValueError(
                "OPDModule.lmbda < 1 mixes in dataset completions, which have no sampler log-probs; "
                "the sampled-token loss needs them. Use loss='divergence' or lmbda=1."
            )

    # ----- where completions come from ------------------------------------------------------
    def completion_source(self) -> str:
        if self.lmbda >= 1.0:
            return "student"
        draw = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)
        if torch.rand(1, generator=draw).item() <= self.lmbda:
            return "student"
        return "teacher" if self.seq_kd else "dataset"

    def teacher_generator(self) -> nn.Module:
        return self.teacher.model

    @property
    def reference(self) -> nn.Module | None:
        """π_ref of G-OPD (frozen; the student's initial weights unless ``reference`` was given), or None."""
        return self._frozen.get("reference")

    # ----- device placement of frozen models ------------------------------------------------
    def _place_frozen(self) -> None:
        self.teacher.to(self.device)
        for model in self._frozen.values():
            model.to(self.device)

    def on_fit_start(self) -> None:
        self._place_frozen()

    def on_validation_start(self) -> None:
        self._place_frozen()

    def on_test_start(self) -> None:
        self._place_frozen()

    # ----- the step -------------------------------------------------------------------------
    def training_step(self, batch: RolloutBatch, batch_idx: int) -> torch.Tensor:
        teacher_out = self.score_teacher(batch)
        loss, metrics = self.loss(batch, teacher_out)
        metrics.update(self.rollout_metrics(batch))
        self.log_rollout(batch, {"loss": loss.detach(), **metrics})
        return loss

    def rollout_metrics(self, batch: RolloutBatch) -> dict[str, torch.Tensor | float]:
        """Extra per-step diagnostics of the training rollouts, logged as ``train/<key>`` (none here)."""
        return {}

    def score_teacher(self, batch: RolloutBatch) -> TeacherOutput:
        """The teacher's judgement; hidden states instead of logits when the lean path applies."""
        if self.chunk_size is not None and self.top_k is None and plain_head(self.student):
            lean = getattr(self.teacher, "score_hidden", lambda _: None)(batch)
            if lean is not None:
                return lean
        return self.teacher.score(batch)

    def loss(self, batch: RolloutBatch, teacher_out: TeacherOutput) -> tuple[torch.Tensor, dict]:
        """The objective on one RolloutBatch, and diagnostics (detached) to log."""
        mask_BT = batch.completion_mask_BT
        if teacher_out.hidden_BTH is not None:  # memory-lean: no [B, T, V] tensor for either model
            terms = hidden_divergence(
                completion_hidden(self.student, batch), self.student.get_output_embeddings().weight,
                teacher_out.hidden_BTH, teacher_out.head_weight_VH, batch.completion_ids_BT, mask_BT,
                kind=self.divergence if self.loss_mode == "divergence" else None, beta=self.beta,
                alpha=self.alpha, temperature=self.temperature, reduction=self.reduction,
                chunk_size=self.chunk_size,
            )
            divergence, student_logp_BT = terms.loss, terms.student_logp_BT
            teacher_logp_BT, entropy_BT = terms.teacher_logp_BT, terms.entropy_BT
        else:
            student_logits_BTV = completion_logits(self.student, batch)
            student_logp_BT = D.token_logprobs(student_logits_BTV, batch.completion_ids_BT)
            teacher_logp_BT = self._teacher_token_logp(batch, teacher_out)
            entropy_BT = D.entropy(student_logits_BTV.detach())
            divergence = None
            if self.loss_mode == "divergence":
                divergence = self._divergence_loss(student_logits_BTV, teacher_out, mask_BT)
        if self.loss_mode == "divergence":
            loss, metrics = divergence, {}
        else:
            loss, metrics = self._sampled_loss(batch, student_logp_BT, teacher_logp_BT)
        with torch.no_grad():
            metrics["teacher_kl"] = D.reduce_masked(student_logp_BT - teacher_logp_BT, mask_BT)
            metrics["entropy"] = D.reduce_masked(entropy_BT, mask_BT)
        return loss, metrics

    @torch.no_grad()
    def reference_logp(self, batch: RolloutBatch) -> torch.Tensor:
        """log π_ref of the completion tokens: (B, T)."""
        return D.token_logprobs(completion_logits(self.reference, batch), batch.completion_ids_BT)

    def _teacher_token_logp(self, batch: RolloutBatch, out: TeacherOutput) -> torch.Tensor:
        if out.token_logp_BT is not None:
            return out.token_logp_BT
        return D.token_logprobs(out.logits_BTV, batch.completion_ids_BT)

    def _divergence_loss(self, student_logits_BTV, out: TeacherOutput, mask_BT) -> torch.Tensor:  # noqa: ANN001
        options = dict(
            kind=self.divergence, beta=self.beta, alpha=self.alpha, mask=mask_BT,
            temperature=self.temperature, reduction=self.reduction,
        )
        if self.top_k is None:
            return D.logits_divergence(student_logits_BTV, out.logits_BTV, chunk_size=self.chunk_size, **options)
        topk_logp_BTK, topk_ids_BTK = out.topk_logp_BTK, out.topk_ids_BTK
        if topk_logp_BTK is None:  # a full-logit teacher: take its top-k here
            teacher_logp_BTV = (out.logits_BTV.float() / self.temperature).log_softmax(-1)
            topk_logp_BTK, topk_ids_BTK = teacher_logp_BTV.topk(self.top_k, dim=-1)
        return D.topk_divergence(student_logits_BTV, topk_logp_BTK, topk_ids_BTK, **options)

    def _sampled_loss(self, batch: RolloutBatch, logp_BT, teacher_logp_BT) -> tuple[torch.Tensor, dict]:  # noqa: ANN001
        mask_BT, sampler_logp_BT = batch.completion_mask_BT, batch.sampler_logp_BT
        old_logp_BT = logp_BT.detach()
        if self.lambda_ == 1.0:
            adv_BT = O.reverse_kl_advantage(sampler_logp_BT, teacher_logp_BT, self.kl_coef)
        else:
            ref_logp_BT = self.reference_logp(batch)
            adv_BT = self.kl_coef * O.gopd_advantage(old_logp_BT, teacher_logp_BT, ref_logp_BT, self.lambda_)
        metrics = {"advantage": D.reduce_masked(adv_BT, mask_BT)}
        if self.estimator == "importance_sampling":
            loss = O.importance_sampling_loss(logp_BT, sampler_logp_BT, adv_BT, mask_BT, reduction=self.reduction)
            return loss, metrics
        is_weights_BT = O.truncated_is_weights(old_logp_BT, sampler_logp_BT, self.tis_cap)
        loss, ppo_metrics = O.ppo_clip_loss(
            logp_BT, old_logp_BT, adv_BT, mask_BT, is_weights_BT=is_weights_BT, reduction=self.reduction, **self.clip
        )
        return loss, {**metrics, **ppo_metrics}

    # ----- teacher identity in checkpoints --------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lit_opd"]["teacher"] = self.teacher.identity()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("lit_opd", {}).get("teacher")
        current = self.teacher.identity()
        if saved is not None and saved != current and not self.allow_teacher_change:
            raise ValueError(
                f"This checkpoint was trained with teacher {saved}, but the configured teacher is "
                f"{current}. Resume with the same teacher, or set allow_teacher_change: true to continue "
                "with the new one on purpose."
            )
