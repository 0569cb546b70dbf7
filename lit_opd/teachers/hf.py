"""A local Hugging Face teacher: full logits from a frozen causal LM, optionally 4/8-bit, optionally
at a scoring temperature τ (the teacher's distribution is softmax(logits / τ), as in Hinton et al.'s KD)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutput

from lit_opd.errors import SettingError
from lit_opd.models import (
    ModelSpec, as_spec, check_model_vocab, completion_hidden, completion_logits, freeze, load_causal_lm,
    load_tokenizer, plain_head,
)
from lit_opd.teachers.base import Teacher
from lit_opd.types import RolloutBatch, SamplingParams, TeacherCapability, TeacherOutput


class TemperatureScaled(nn.Module):
    """A causal LM whose logits are divided by ``temperature``: what :class:`HFTeacher` scores with,
    exposed (``HFTeacher.scoring_model``) so that code that calls the model directly (ListOPD's
    calibration) sees the same distribution as ``score``."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model, self.temperature = model, float(temperature)

    def forward(self, *args, **kwargs) -> CausalLMOutput:
        return CausalLMOutput(logits=self.model(*args, **kwargs).logits / self.temperature)


class HFTeacher(Teacher):
    """Frozen transformers causal LM that returns full-vocabulary logits.

    Args:
        model: a :class:`ModelSpec`, a path/hub id, or an already built ``nn.Module``.
        tokenizer: tokenizer path or object; defaults to the one stored with ``model``.
        name: label for logs and the checkpoint identity when ``model`` is an object.
        temperature: scoring temperature τ > 0: ``score`` and ``score_hidden`` return the
            distribution softmax(logits / τ), and ``scoring_model()`` is the model that computes it
            (1.0 = the model as trained). τ > 1 flattens the teacher (fatter tails), τ < 1 sharpens
            it. Teacher *rollouts* (``generator()``, ``generate_text``) use the raw model; their
            temperature is the sampling temperature.
    """

    capability: ClassVar[TeacherCapability] = TeacherCapability.FULL_LOGITS

    def __init__(
        self,
        model: ModelSpec | str | nn.Module,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        name: str | None = None,
        temperature: float = 1.0,
    ) -> None:
        number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
        if not (number and 0.0 < temperature < float("inf")):
            raise SettingError(f"HFTeacher.temperature={temperature!r} must be a finite number > 0")
        self.temperature = float(temperature)
        self.spec = None if isinstance(model, nn.Module) else as_spec(model)
        self.model = freeze(load_causal_lm(model))
        self.tokenizer = load_tokenizer(tokenizer, model)
        # Rows beyond the tokenizer's ids are padding (the losses compare the ids both models have).
        check_model_vocab(self.model, self.tokenizer, "teacher")
        self.name = name or (self.spec.path if self.spec else type(self.model).__name__)

    def to(self, device: torch.device | str) -> HFTeacher:
        if self.spec is None or self.spec.quantization is None:  # bitsandbytes places its own weights
            self.model.to(device)
        return self

    @torch.no_grad()
    def score(self, batch: RolloutBatch) -> TeacherOutput:
        return TeacherOutput(logits_BTV=completion_logits(self.scoring_model(), batch))

    def scoring_model(self) -> nn.Module:
        """The model whose logits ``score`` returns: ``model``, divided by ``temperature`` if it is not 1."""
        return self.model if self.temperature == 1.0 else TemperatureScaled(self.model, self.temperature)

    def generator(self) -> nn.Module:
        return self.model

    @torch.no_grad()
    def generate_text(
        self, prompts: Sequence[str], max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
        seed: int = 0,
    ) -> list[list[str | None]]:
        """``num_samples`` sampled continuations of each raw-text prompt, decoded to text (the same
        KV-cached sampler as the student's rollouts)."""
        from lit_opd.rollout.prompts import collate_prompts, decode_completions, eos_ids
        from lit_opd.rollout.sampling import sample

        records = [{"prompt_ids": self.tokenizer(p)["input_ids"], "answer": None, "answer_ids": [],
                    "row_index": i, "row": {"prompt": p}} for i, p in enumerate(prompts)]
        batch = collate_prompts(records, self.tokenizer.pad_token_id).to(self.model.device)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                num_samples=num_samples)
        out = sample(self.model, batch.prompt_ids_BP, batch.prompt_mask_BP, params,
                     eos_token_ids=eos_ids(self.tokenizer), pad_token_id=self.tokenizer.pad_token_id,
                     generator=torch.Generator(self.model.device).manual_seed(seed))
        texts = decode_completions(self.tokenizer, out.tokens_BT, out.mask_BT)
        return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]

    @torch.no_grad()
    def score_hidden(self, batch: RolloutBatch) -> TeacherOutput | None:
        """Hidden states and output weight instead of logits (the memory-lean loss path), or None
        when this model's logits are not a plain linear map of its last hidden state."""
        if not plain_head(self.model):
            return None
        return TeacherOutput(
            hidden_BTH=completion_hidden(self.model, batch),
            head_weight_VH=self._head_weight(),
        )

    def _head_weight(self) -> torch.Tensor:
        """The output layer's weight; with τ ≠ 1 divided by τ (h·(W/τ)ᵀ = logits/τ), a [V, H] copy
        that τ = 1 must not pay for."""
        weight = self.model.get_output_embeddings().weight
        return weight if self.temperature == 1.0 else weight / self.temperature

    def identity(self) -> dict:
        ident = local_identity(self)
        if self.temperature != 1.0:  # identities recorded before the option existed stay equal
            ident["temperature"] = self.temperature
        return ident


def local_identity(teacher: Teacher) -> dict:
    """A local teacher's checkpoint identity: its class and name, and its model's spec (path,
    revision, dtype, quantization) or, for a model given as an object, its parameter count."""
    ident = {"class": type(teacher).__name__, "name": teacher.name}
    if teacher.spec is not None:
        ident.update(teacher.spec.identity())
    else:
        ident["num_parameters"] = sum(p.numel() for p in teacher.model.parameters())
    return ident
