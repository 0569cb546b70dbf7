"""Typed containers that flow through one OPD step: prompts → rollout → teacher → loss.

Shapes use the house letters: B batch rows (prompts × samples), P prompt length (left padded),
T completion length (right padded), V vocabulary, K top-k entries.
"""

from __future__ import annotations

import enum
from typing import Literal
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from lit_opd.errors import SettingError


@dataclass(frozen=True)
class SamplingParams:
    """How the rollout engine turns prompts into completions.

    Args:
        max_new_tokens: completion length limit T_max; a row that reaches it without EOS is "cut".
        temperature: logits are divided by it before sampling; ignored when ``greedy``.
        top_p: nucleus sampling mass (1.0 = off).
        top_k: keep the k most likely tokens (0 = off).
        num_samples: completions drawn per prompt (G); rows of one prompt are adjacent.
        stop_at_eos: stop a row at its first EOS (the EOS token itself is part of the completion).
        greedy: argmax decoding (validation).
        decode_step: how the built-in engine runs each new token: "auto" (the lean decode step for
            Llama/Mistral/Qwen layouts, else the model's own forward), "lean" (require it) or "hf"
            (always call the model). Other engines (vLLM) ignore it.
        cuda_graph: on a CUDA device, capture the lean decode step once per rollout in a CUDA graph
            and replay it for every token (off: launch its kernels one by one, e.g. to profile).
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1
    stop_at_eos: bool = True
    greedy: bool = False
    decode_step: Literal["auto", "lean", "hf"] = "auto"
    cuda_graph: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SettingError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise SettingError(
                f"SamplingParams.temperature must be > 0, got {self.temperature}; use greedy=True for argmax"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise SettingError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SettingError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.decode_step not in ("auto", "lean", "hf"):
            raise SettingError(f"SamplingParams.decode_step={self.decode_step!r}: use 'auto', 'lean' or 'hf'")
        if self.num_samples < 1:
            raise SettingError(f"SamplingParams.num_samples must be >= 1, got {self.num_samples}")


@dataclass
class PromptBatch:
    """What the DataLoader yields (CPU), before the rollout.

    Fields:
        prompt_ids_BP: int64 (B, P), left padded with the pad id.
        prompt_mask_BP: int64 (B, P), 1 on real prompt tokens.
        answers: B reference answers (None where the source has none).
        answer_ids: B token-id lists of ``answer + EOS`` (empty where no answer); used by the
            off-policy (dataset) completions of GKD and by SFT.
        row_index_B: int64 (B,), index of each prompt in its source (for logs and debugging).
        rows: B source rows as the prompt source gave them (every field: ``prompt``, ``answer`` and
            whatever else a row holds, e.g. ranking ``candidates`` or a ``domain``), so methods read
            a row's metadata from the batch instead of looking it up.
    """

    prompt_ids_BP: Tensor
    prompt_mask_BP: Tensor
    answers: list[str | None]
    answer_ids: list[list[int]]
    row_index_B: Tensor
    rows: list[dict] = field(default_factory=list)

    def to(self, device: torch.device | str) -> PromptBatch:
        return replace(
            self,
            prompt_ids_BP=self.prompt_ids_BP.to(device),
            prompt_mask_BP=self.prompt_mask_BP.to(device),
            row_index_B=self.row_index_B.to(device),
        )


@dataclass
class RolloutBatch:
    """Prompts with their completions, ready for teacher scoring and the loss.

    Fields:
        prompt_ids_BP: int64 (B, P), left padded.
        prompt_mask_BP: int64 (B, P).
        completion_ids_BT: int64 (B, T), right padded with pad id after EOS / the limit.
        completion_mask_BT: bool (B, T), True on generated tokens (EOS included, padding excluded).
        loss_mask_BT: bool (B, T), True on the completion tokens the objective trains on. Equal to
            ``completion_mask_BT`` (filled in when not given) unless a source says otherwise, e.g. a
            tool's output inside a multi-turn completion is part of the completion but not trained on.
        sampler_logp_BT: float (B, T) log-prob of each token under the distribution it was drawn
            from (temperature / top-k / top-p applied); None for dataset completions.
        answers: B reference answers (None where unknown).
        row_index_B: int64 (B,), source prompt index of each row (rows of one prompt adjacent).
        source: "student" (on-policy), "teacher" (seq-KD), "dataset" (supervised), "greedy" (val).
        truncated_B: bool (B,), True where the row hit ``max_new_tokens`` without EOS.
        correct_B: float (B,) verifier result (1 correct, 0 wrong), validation only.
        rollout_seconds: wall time spent generating this batch.
        rows: B source rows (see :class:`PromptBatch`), repeated for the samples of one prompt.
    """

    prompt_ids_BP: Tensor
    prompt_mask_BP: Tensor
    completion_ids_BT: Tensor
    completion_mask_BT: Tensor
    sampler_logp_BT: Tensor | None
    answers: list[str | None]
    row_index_B: Tensor
    source: str = "student"
    truncated_B: Tensor | None = None
    correct_B: Tensor | None = None
    rollout_seconds: float = 0.0
    extras: dict = field(default_factory=dict)
    loss_mask_BT: Tensor | None = None
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.loss_mask_BT is None:
            self.loss_mask_BT = self.completion_mask_BT

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids_BP.shape[1]

    @property
    def input_ids_BL(self) -> Tensor:
        """Prompt and completion side by side: (B, P+T)."""
        return torch.cat([self.prompt_ids_BP, self.completion_ids_BT], dim=1)

    @property
    def attention_mask_BL(self) -> Tensor:
        return torch.cat([self.prompt_mask_BP, self.completion_mask_BT.long()], dim=1)

    @property
    def position_ids_BL(self) -> Tensor:
        """Positions that skip left padding, so a row means the same whatever its padding."""
        return (self.attention_mask_BL.cumsum(-1) - 1).clamp(min=0)

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask_BT.sum())

    def to_state(self) -> dict:
        """Plain tensors and lists on the CPU, safe to put in a checkpoint (``extras`` dropped)."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "extras"}
        return {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in values.items()}

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str) -> RolloutBatch:
        """The inverse of :meth:`to_state`, with tensors on ``device``."""
        return cls(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in state.items()})


class TeacherCapability(enum.IntEnum):
    """What a teacher can return, from least to most informative."""

    TEXT_ONLY = 0
    TOKEN_LOGPROBS = 1
    TOPK_LOGPROBS = 2
    FULL_LOGITS = 3


@dataclass
class TeacherOutput:
    """The teacher's judgement of a RolloutBatch's completion tokens.

    Fields (each None unless the teacher's capability provides it):
        logits_BTV: float (B, T, V), logits predicting completion token t (full-logit teachers).
        topk_logp_BTK / topk_ids_BTK: (B, T, K) the teacher's top-k log-probs and their ids.
        token_logp_BT: float (B, T) log-prob of the sampled completion tokens.
        hidden_BTH / head_weight_VH: the last hidden states that predict each completion token and
            the output layer's weight (a local teacher asked for the memory-lean path; logits are
            then ``hidden_BTH @ head_weight_VHᵀ``, computed chunk by chunk inside the loss).
        answered_B: bool (B,), False for rows the teacher gave no answer for (a remote call that
            failed after its retries); their other fields hold finite filler and the method drops
            them from the loss. None = every row answered.
    """

    logits_BTV: Tensor | None = None
    topk_logp_BTK: Tensor | None = None
    topk_ids_BTK: Tensor | None = None
    token_logp_BT: Tensor | None = None
    hidden_BTH: Tensor | None = None
    head_weight_VH: Tensor | None = None
    answered_B: Tensor | None = None
