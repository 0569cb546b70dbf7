"""Objectives as components: what a method minimises, chosen in YAML by ``class_path``.

An objective declares the teacher capability it needs, whether it needs a frozen reference π_ref
or the sampler's log-probs, and whether it can run on the memory-lean hidden-state path. The
method computes the per-token terms once (:func:`lit_opd.objectives.paths.token_terms`, the one
place that picks the logits or the hidden-state path) and hands them to the objective.

    model:
      class_path: lit_opd.OPDModule
      init_args:
        objective:
          class_path: lit_opd.objectives.Divergence
          init_args: {kind: jsd, beta: 0.0}

The math itself lives in the pure functions of :mod:`~lit_opd.objectives.divergences` and
:mod:`~lit_opd.objectives.sampled`; these classes only hold settings and compose them.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from lit_opd.errors import SettingError
from lit_opd.objectives import divergences as D
from lit_opd.objectives import sampled as O
from lit_opd.types import RolloutBatch, TeacherCapability, TeacherOutput

REDUCTIONS = ("token_mean", "seq_mean", "sum")


@dataclass
class TokenTerms:
    """Per-token results of one student forward against the teacher, on either path.

    Fields:
        student_logp_BT: log q_θ of the completion tokens (differentiable, except on the lean path
            with a fused divergence, whose gradient lives in ``fused_loss``).
        teacher_logp_BT, entropy_BT: the teacher's token log-probs and the student's entropy (detached).
        student_logits_BTV: the student's logits (logits path only).
        fused_loss: the reduced divergence with its gradient fused in (lean path with a divergence).
        reference_logp_BT: log π_ref of the completion tokens, for objectives that use a reference.
    """

    student_logp_BT: Tensor
    teacher_logp_BT: Tensor
    entropy_BT: Tensor
    student_logits_BTV: Tensor | None = None
    fused_loss: Tensor | None = None
    reference_logp_BT: Tensor | None = None


class Objective(abc.ABC):
    """The loss of a method on one scored RolloutBatch; subclasses set the class flags (or override
    the methods that read them, where a setting decides) and ``__call__``."""

    #: The least a teacher must return for this objective.
    capability: ClassVar[TeacherCapability] = TeacherCapability.FULL_LOGITS
    #: The loss needs the sampler's log-probs, i.e. on-policy completions only.
    on_policy_only: ClassVar[bool] = False

    def needs(self) -> TeacherCapability:
        return self.capability

    def uses_reference(self) -> bool:
        """True when the loss needs log π_ref (a frozen copy of the initial student by default)."""
        return False

    def needs_sampler_logp(self) -> bool:
        return self.on_policy_only

    def lean_options(self) -> dict | None:
        """Settings of the hidden-state path (``lit_opd.objectives.lean.hidden_divergence``), or None
        when this objective needs the logits path."""
        return None

    @abc.abstractmethod
    def __call__(
        self, batch: RolloutBatch, terms: TokenTerms, teacher_out: TeacherOutput
    ) -> tuple[Tensor, dict]:
        """(loss, detached diagnostics) on ``batch.loss_mask_BT``."""

    def settings(self) -> dict:
        """The class and its constructor arguments, for checkpoints and logs."""
        cls = self.component_class()
        names = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
        return {"class": cls.__name__, **{n: getattr(self, n) for n in names}}

    def component_class(self) -> type:
        """This objective's class (a YAML default is a jsonargparse lazy subclass of it)."""
        def is_lazy(cls: type) -> bool:
            return cls.__module__.startswith("jsonargparse") or cls.__name__.startswith("LazyInstance_")

        return next(c for c in type(self).__mro__ if not is_lazy(c))


class Divergence(Objective):
    """A full-distribution divergence per completion token (GKD), reduced over the loss mask.

    Args:
        kind: "jsd" (generalized JSD(β)), "forward_kl", "reverse_kl", "skew_forward_kl",
            "skew_reverse_kl" or "tvd".
        beta: JSD interpolation (0 forward KL, 1 reverse KL).
        alpha: skew KL mixing weight.
        temperature: divides both models' logits inside the divergence.
        top_k: compare on the teacher's top-k tokens plus a tail bucket (None = full vocabulary);
            a teacher that returns top-k log-probs is then enough.
        chunk_size: completion tokens per chunk; with plain-linear-head models the divergence is
            then computed from hidden states (no [B, T, V] logits tensor of either model).
        reduction: "token_mean" (GKD/TRL), "seq_mean" or "sum".
    """

    def __init__(
        self,
        kind: Literal["jsd", "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "tvd"] = "jsd",
        beta: float = 0.5,
        alpha: float = 0.1,
        temperature: float = 1.0,
        top_k: int | None = None,
        chunk_size: int | None = None,
        reduction: Literal["token_mean", "seq_mean", "sum"] = "token_mean",
    ) -> None:
        if kind not in D.KINDS:
            raise SettingError(f"Divergence.kind={kind!r}: use one of {list(D.KINDS)}")
        for name, value in (("beta", beta), ("alpha", alpha)):
            if not 0.0 <= value <= 1.0:
                raise SettingError(f"Divergence.{name}={value} must be in [0, 1]")
        if temperature <= 0:
            raise SettingError(f"Divergence.temperature={temperature} must be > 0")
        if top_k is not None and top_k < 1:
            raise SettingError(f"Divergence.top_k={top_k} must be >= 1 or null (full vocabulary)")
        _check_common("Divergence", chunk_size, reduction)
        self.kind, self.beta, self.alpha, self.temperature = kind, beta, alpha, temperature
        self.top_k, self.chunk_size, self.reduction = top_k, chunk_size, reduction

    def needs(self) -> TeacherCapability:
        return TeacherCapability.FULL_LOGITS if self.top_k is None else TeacherCapability.TOPK_LOGPROBS

    def lean_options(self) -> dict | None:
        if self.chunk_size is None or self.top_k is not None:
            return None
        return dict(kind=self.kind, beta=self.beta, alpha=self.alpha, temperature=self.temperature,
                    reduction=self.reduction, chunk_size=self.chunk_size)

    def __call__(
        self, batch: RolloutBatch, terms: TokenTerms, teacher_out: TeacherOutput
    ) -> tuple[Tensor, dict]:
        if terms.fused_loss is not None:  # computed with the student's hidden states already
            return terms.fused_loss, {}
        options = dict(kind=self.kind, beta=self.beta, alpha=self.alpha, mask=batch.loss_mask_BT,
                       temperature=self.temperature, reduction=self.reduction)
        logits_BTV = terms.student_logits_BTV
        if self.top_k is None:
            chunked = dict(chunk_size=self.chunk_size, **options)
            return D.logits_divergence(logits_BTV, teacher_out.logits_BTV, **chunked), {}
        topk_logp_BTK, topk_ids_BTK = teacher_out.topk_logp_BTK, teacher_out.topk_ids_BTK
        if topk_logp_BTK is None:  # a full-logit teacher: take its top-k here
            teacher_logp_BTV = (teacher_out.logits_BTV.float() / self.temperature).log_softmax(-1)
            if self.top_k > teacher_logp_BTV.shape[-1]:
                raise SettingError(
                    f"Divergence.top_k={self.top_k} is above the teacher's vocabulary "
                    f"({teacher_logp_BTV.shape[-1]} ids); lower it or set top_k: null (the full distribution)"
                )
            topk_logp_BTK, topk_ids_BTK = teacher_logp_BTV.topk(self.top_k, dim=-1)
        elif topk_logp_BTK.shape[-1] != self.top_k:  # a top-k teacher (e.g. a server) sorted descending
            if topk_logp_BTK.shape[-1] < self.top_k:
                raise SettingError(
                    f"Divergence.top_k={self.top_k} but the teacher returned only {topk_logp_BTK.shape[-1]} "
                    "log-probs per position; lower top_k or raise the teacher's k (e.g. ServerTeacher.k)"
                )
            topk_logp_BTK, topk_ids_BTK = topk_logp_BTK[..., : self.top_k], topk_ids_BTK[..., : self.top_k]
        return D.topk_divergence(logits_BTV, topk_logp_BTK, topk_ids_BTK, **options), {}


class SampledReward(Objective):
    """The sampled-token reverse KL as a per-token reward (Tinker's OPD), optionally extrapolated
    against a reference (G-OPD), optimised with importance sampling or PPO clipping.

    ``A_t = −κ (log q_samp(y_t) − log p(y_t))``; with ``lambda_ ≠ 1``
    ``A_t = κ [λ (log p − log π_ref) − (log q_old − log π_ref)]`` (λ > 1: ExOPD).

    Args:
        estimator: "importance_sampling" (Tinker) or "ppo" (verl: clip, dual clip, truncated IS).
        kl_coef: κ, scale of the reward.
        lambda_: G-OPD reward extrapolation (1 = standard OPD).
        clip_eps_low, clip_eps_high, dual_clip, tis_cap: PPO clip range, dual clip (None = off) and
            truncated importance-sampling cap (``estimator="ppo"``).
        is_cap: ``estimator="importance_sampling"``: cap the weight exp(log q_θ − log q_samp) at this
            value (truncated IS; corrects an inference engine such as vLLM drifting from the student,
            see ``rollout/mismatch_kl``). None = uncapped (Tinker's loss).
        reduction: "token_mean", "seq_mean" or "sum".
        chunk_size: student token log-probs from hidden states, chunk by chunk (no [B, T, V] logits).
    """

    capability: ClassVar[TeacherCapability] = TeacherCapability.TOKEN_LOGPROBS
    on_policy_only: ClassVar[bool] = True

    def __init__(
        self,
        estimator: Literal["importance_sampling", "ppo"] = "importance_sampling",
        kl_coef: float = 1.0,
        lambda_: float = 1.0,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = 3.0,
        tis_cap: float = 5.0,
        reduction: Literal["token_mean", "seq_mean", "sum"] = "token_mean",
        chunk_size: int | None = None,
        is_cap: float | None = None,
    ) -> None:
        if is_cap is not None and is_cap <= 0:
            raise SettingError(f"SampledReward.is_cap={is_cap} must be > 0 (or null for no cap)")
        if estimator not in ("importance_sampling", "ppo"):
            raise SettingError(f"SampledReward.estimator={estimator!r}: use 'importance_sampling' or 'ppo'")
        _check_common("SampledReward", chunk_size, reduction)
        self.estimator, self.kl_coef, self.lambda_ = estimator, kl_coef, lambda_
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, dual_clip
        self.tis_cap, self.reduction, self.chunk_size, self.is_cap = tis_cap, reduction, chunk_size, is_cap

    def uses_reference(self) -> bool:
        return self.lambda_ != 1.0

    def lean_options(self) -> dict | None:
        return None if self.chunk_size is None else dict(kind=None, chunk_size=self.chunk_size)

    def __call__(
        self, batch: RolloutBatch, terms: TokenTerms, teacher_out: TeacherOutput
    ) -> tuple[Tensor, dict]:
        mask_BT, sampler_logp_BT, logp_BT = batch.loss_mask_BT, batch.sampler_logp_BT, terms.student_logp_BT
        old_logp_BT = logp_BT.detach()
        if self.lambda_ == 1.0:
            adv_BT = O.reverse_kl_advantage(sampler_logp_BT, terms.teacher_logp_BT, self.kl_coef)
        else:
            adv_BT = self.kl_coef * O.gopd_advantage(
                old_logp_BT, terms.teacher_logp_BT, terms.reference_logp_BT, self.lambda_
            )
        metrics = {"advantage": D.reduce_masked(adv_BT, mask_BT)}
        if self.estimator == "importance_sampling":
            loss = O.importance_sampling_loss(
                logp_BT, sampler_logp_BT, adv_BT, mask_BT, reduction=self.reduction, cap=self.is_cap
            )
            return loss, metrics
        is_weights_BT = O.truncated_is_weights(old_logp_BT, sampler_logp_BT, self.tis_cap)
        loss, ppo_metrics = O.ppo_clip_loss(
            logp_BT, old_logp_BT, adv_BT, mask_BT, is_weights_BT=is_weights_BT, reduction=self.reduction,
            eps_low=self.clip_eps_low, eps_high=self.clip_eps_high, dual_clip=self.dual_clip,
        )
        return loss, {**metrics, **ppo_metrics}


def _check_common(owner: str, chunk_size: int | None, reduction: str) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise SettingError(f"{owner}.chunk_size={chunk_size} must be >= 1 or null")
    if reduction not in REDUCTIONS:
        raise SettingError(f"{owner}.reduction={reduction!r}: use one of {list(REDUCTIONS)}")
