"""A text-only teacher over a local transformers model: the same interface as :class:`APITeacher`
(text continuations of prefixes, nothing else) without a server, so a local model with *any*
tokenizer can teach a text-only method. Nothing here compares its vocabulary with the student's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_opd.errors import SettingError
from lit_opd.models import ModelSpec, as_spec, freeze, load_causal_lm, load_tokenizer
from lit_opd.teachers.api import CONTINUE_INSTRUCTION, check_stop, check_text_request, continue_messages
from lit_opd.teachers.api import cut_at_stop, no_logprobs
from lit_opd.teachers.base import Teacher
from lit_opd.teachers.hf import local_identity
from lit_opd.types import RolloutBatch, TeacherCapability, TeacherOutput


#: Usage counters of a local text teacher (logged as ``teacher/<key>``; ``tokens`` = prompt + completion).
TEXT_COUNTERS = ("calls", "samples", "prompt_tokens", "completion_tokens", "tokens")


class HFTextTeacher(Teacher):
    """Text continuations from a local causal LM's ``generate``.

    Args:
        model: a :class:`ModelSpec`, a path/hub id, or an already built ``nn.Module``.
        tokenizer: tokenizer path or object; defaults to the one stored with ``model``. It may
            differ from the student's: only text crosses between them.
        stop: strings that end a continuation (generation stops there; the string is cut off).
        chat: render each prefix with the tokenizer's chat template as a user message that asks for
            the continuation (``continue_instruction``, optional ``system_prompt``), as
            ``APITeacher(mode="chat")`` does; a ``ChatPrefix`` is rendered as its own conversation (roles
            kept) with the response so far as the assistant's turn. False continues the raw prefix.
        batch_size: prompts per ``generate`` call (each with all its samples).
        name: label for the checkpoint identity when ``model`` is an object.

    Sampling settings the caller does not pass (top-k, top-p, ...) come from the model's
    ``generation_config``, as a server running the model would apply them.
    """

    capability: ClassVar[TeacherCapability] = TeacherCapability.TEXT_ONLY

    def __init__(
        self, model: ModelSpec | str | nn.Module, tokenizer: str | PreTrainedTokenizerBase | None = None,
        stop: list[str] | None = None, chat: bool = False, batch_size: int = 16,
        continue_instruction: str = CONTINUE_INSTRUCTION, system_prompt: str | None = None,
        name: str | None = None,
    ) -> None:
        if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
            raise SettingError(f"HFTextTeacher.batch_size={batch_size!r} must be an integer >= 1")
        if chat and not (isinstance(continue_instruction, str) and continue_instruction.strip()):
            raise SettingError(f"HFTextTeacher.continue_instruction={continue_instruction!r} must be a "
                             "non-empty instruction (the default asks for the continuation only)")
        self.stop, self.chat, self.batch_size = check_stop("HFTextTeacher", stop), bool(chat), batch_size
        self.continue_instruction, self.system_prompt = continue_instruction, system_prompt
        self.spec = None if isinstance(model, nn.Module) else as_spec(model)
        self.tokenizer = load_tokenizer(tokenizer, model)
        if self.chat and not getattr(self.tokenizer, "chat_template", None):
            raise SettingError("HFTextTeacher.chat=True needs a tokenizer with a chat template, and this one "
                             "has none; set chat: false to continue raw prefixes, or pass a tokenizer that "
                             "has one")
        self.model = freeze(load_causal_lm(model))
        self.name = name or (self.spec.path if self.spec else type(self.model).__name__)
        # What this teacher has cost, counted like a server's usage: one call per prefix, its prompt
        # tokens once plus every sampled token up to and including the end token.
        self.counts = dict.fromkeys(TEXT_COUNTERS, 0)

    # ----- protocol -----------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> HFTextTeacher:
        if self.spec is None or self.spec.quantization is None:  # bitsandbytes places its own weights
            self.model.to(device)
        return self

    def score(self, batch: RolloutBatch) -> TeacherOutput:  # noqa: ARG002 - nothing to score with
        raise no_logprobs("HFTextTeacher")

    def stats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.counts.items()}

    def restore_stats(self, stats: dict[str, float]) -> None:
        for key in TEXT_COUNTERS:
            self.counts[key] = int(stats.get(key, self.counts[key]))

    def identity(self) -> dict:
        ident = local_identity(self)
        if self.chat:
            ident["chat"] = True
        return ident

    @torch.no_grad()
    def generate_text(
        self, prompts: Sequence[str], max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
        seed: int = 0,
    ) -> list[list[str | None]]:
        """``num_samples`` continuations of each prompt (``max_new_tokens`` of *this* model's tokens):
        sampled at ``temperature``, greedy at 0; the same ``seed`` gives the same texts."""
        check_text_request("HFTextTeacher", max_new_tokens, num_samples, temperature)
        texts = [self._render(p) for p in prompts]
        out: list[list[str | None]] = []
        with self._fork_rng():
            torch.manual_seed(seed)
            for start in range(0, len(texts), self.batch_size):
                chunk = texts[start : start + self.batch_size]
                out.extend(self._generate(chunk, max_new_tokens, num_samples, float(temperature)))
        return out

    # ----- internals ----------------------------------------------------------------------------
    def _render(self, prefix: str) -> str:
        if not self.chat:
            return prefix
        messages = continue_messages(prefix, self.continue_instruction, self.system_prompt)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _generate(self, texts: list[str], max_new_tokens: int, num_samples: int,
                  temperature: float) -> list[list[str]]:
        """One ``generate`` call for ``texts``: every sample when sampling, one greedy answer
        repeated otherwise (greedy samples are identical, and generate refuses several)."""
        device = self.model.device
        # A rendered chat template already holds its special tokens; a raw prefix gets the usual ones.
        enc = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt",
                             add_special_tokens=not self.chat).to(device)
        sampling = temperature > 0
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": sampling,
                  "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self._eos_ids() or None}
        if sampling:
            kwargs.update(temperature=temperature, num_return_sequences=num_samples)
        if self.stop:  # stop early; the overshoot to the end of the matching token is cut below
            kwargs.update(stop_strings=self.stop, tokenizer=self.tokenizer)
        ids = self.model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1] :]
        self._count_usage(enc["attention_mask"], ids, num_samples if sampling else 1)
        decoded = [cut_at_stop(t, self.stop) for t in
                   self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]
        per = num_samples if sampling else 1
        return [decoded[i * per : (i + 1) * per] * (num_samples // per) for i in range(len(texts))]

    def _count_usage(self, prompt_mask_BP: torch.Tensor, ids_NT: torch.Tensor, per_prompt: int) -> None:
        """Add one generate call's prompts and sampled tokens (each up to its first end token) to
        ``counts``; the padding after an end token is not a token the teacher produced."""
        ends_NT = torch.isin(ids_NT, torch.tensor(self._eos_ids() or [-1], device=ids_NT.device))
        after_end_NT = (ends_NT.cumsum(-1) - ends_NT.long()) > 0
        sampled = int((~after_end_NT).sum()) if ids_NT.numel() else 0
        prompt = int(prompt_mask_BP.sum())
        self.counts["calls"] += prompt_mask_BP.shape[0]
        self.counts["samples"] += prompt_mask_BP.shape[0] * per_prompt
        self.counts["prompt_tokens"] += prompt
        self.counts["completion_tokens"] += sampled
        self.counts["tokens"] += prompt + sampled

    def _eos_ids(self) -> list[int]:
        """The tokenizer's EOS and the model's own end tokens (chat models often end turns with one the
        tokenizer does not call EOS)."""
        ids: list[int] = []
        config = getattr(self.model, "generation_config", None)
        for value in (self.tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
            for i in value if isinstance(value, (list, tuple)) else [value]:
                if i is not None and i not in ids:
                    ids.append(int(i))
        return ids

    def _fork_rng(self):  # noqa: ANN202 - a context manager
        """Seed without disturbing the caller's random state: only the CPU generator, plus the
        model's device's when it is an accelerator."""
        device = self.model.device
        if device.type == "cpu":
            return torch.random.fork_rng(devices=[])
        return torch.random.fork_rng(devices=[device], device_type=device.type)
