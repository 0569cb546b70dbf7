"""Prompt rows → token ids (chat template, length limit) and left-padded PromptBatches."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Protocol, runtime_checkable
from pathlib import Path

import jinja2
import torch

from lit_opd.errors import MissingFile, SettingError
from lit_opd.rollout.sources import split_reference
from lit_opd.types import PromptBatch, RolloutBatch

# Roles every chat template renders; a message with another role is checked to appear in the output.
COMMON_ROLES = ("system", "user", "assistant")
# apply_chat_template arguments lit_opd sets itself: not template variables a user may pass.
RESERVED_TEMPLATE_ARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


def read_chat_template(value: str) -> str:
    """``chat_template``'s Jinja text: given inline (it holds ``{{`` or ``{%``), or read from a file
    (a ``.jinja`` file, or a JSON file such as ``chat_template.json`` / ``tokenizer_config.json``
    with a ``chat_template`` key)."""
    if not isinstance(value, str) or not value.strip():
        raise SettingError(f"chat_template={value!r} must be a Jinja template or the path of a file "
                         "holding one")
    if "{{" in value or "{%" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise MissingFile(f"chat_template={value!r} is neither an existing file nor a Jinja "
                                "template (no '{{' or '{%'); point it at a .jinja file or give the "
                                "template text")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        template = json.loads(text).get("chat_template")
        if not isinstance(template, str):
            raise SettingError(f"chat_template={value!r}: this JSON file has no string 'chat_template' key; "
                             "point at a .jinja file or a chat_template.json")
        return template
    return text


def check_template_kwargs(kwargs: dict | None) -> dict:
    """``chat_template_kwargs`` as a dict of template variables, refusing those lit_opd sets itself."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise SettingError(f"chat_template_kwargs={kwargs!r} must map variable names to values, e.g. "
                         "{enable_thinking: false}")
    reserved = sorted(RESERVED_TEMPLATE_ARGS & kwargs.keys())
    if reserved:
        raise SettingError(f"chat_template_kwargs.{reserved[0]} is set by lit_opd itself; remove it (use "
                         "chat_template to replace the template)")
    return dict(kwargs)


class PromptTokenizer:
    """Turns source rows into ``{"prompt_ids", "answer", "answer_ids", "row_index", "row"}`` records;
    ``row`` is a shallow copy of the source row, so fields the encoder does not read (a ranking's
    ``candidates``, a ``domain``, ...) still reach the method through the batch. In that copy a
    conversational row's reference turn is split off (:func:`~lit_opd.rollout.sources.split_reference`:
    ``messages`` end before it, ``answer`` holds it unless the row had one) and, when the chat template
    is used, ``prompt_messages`` holds the messages it rendered (the system prompt included), so that a
    text-only teacher can be sent the conversation with its roles (:class:`ChatPrefix`).

    ``chat_template`` (a Jinja template, or a file holding one) replaces the tokenizer's own;
    ``chat_template_kwargs`` are extra template variables (e.g. Qwen3's ``enable_thinking: false``)."""

    def __init__(
        self,
        tokenizer,  # noqa: ANN001 - any transformers tokenizer
        max_prompt_tokens: int,
        over_long: str,
        use_chat_template: bool | None,
        system_prompt: str | None,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> None:
        if over_long not in ("error", "truncate", "skip"):
            raise SettingError(f"over_long_prompts={over_long!r}: use 'error', 'truncate' or 'skip'")
        if max_prompt_tokens < 1:
            raise SettingError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        self.template = read_chat_template(chat_template) if chat_template is not None else None
        self.template_kwargs = check_template_kwargs(chat_template_kwargs)
        if use_chat_template is False and (self.template is not None or self.template_kwargs):
            raise SettingError("chat_template / chat_template_kwargs are set but use_chat_template is false; "
                             "drop them or set use_chat_template: true")
        has_template = self.template is not None or getattr(tokenizer, "chat_template", None) is not None
        if use_chat_template and not has_template:
            raise SettingError("use_chat_template=True but the tokenizer has no chat_template; set it to false "
                             "or give one with chat_template")
        if self.template_kwargs and not has_template:
            raise SettingError("chat_template_kwargs are set but the tokenizer has no chat template to pass "
                             "them to; give one with chat_template or drop chat_template_kwargs")
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.over_long = over_long
        self.chat = has_template if use_chat_template is None else use_chat_template
        self.system_prompt = system_prompt
        self.skipped = 0  # over-long rows the last ``rows`` call dropped (over_long="skip")

    def render(self, messages: list[dict], tokenize: bool) -> list[int] | str:
        """``messages`` through the chat template (the override and its variables applied), ending
        with the assistant's generation cue."""
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=tokenize, chat_template=self.template,
            **self.template_kwargs)
        if not tokenize:
            return encoded
        # transformers 5 returns a BatchEncoding here, older versions a list.
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def prompt_messages(self, row: dict) -> list[dict]:
        """The messages the chat template renders for ``row``: its ``messages`` (or its ``prompt`` as
        a user turn), after the system prompt unless the row starts with its own."""
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        if self.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def prompt_ids(self, row: dict, where: str) -> list[int]:
        if "prompt" in row and "messages" in row:
            raise SettingError(
                f"{where} has both 'prompt' and 'messages'; keep one (which one is used would depend on "
                "whether the tokenizer has a chat template)"
            )
        if row.get("prompt") == "":
            raise SettingError(f"{where} has an empty 'prompt'; remove the row or write its prompt")
        if self.chat:
            ids = self._chat_ids(row, where)
        elif "prompt" not in row:
            raise SettingError(
                f"{where} has 'messages' but the chat template is off; set use_chat_template: true "
                "with a tokenizer that has one, or give a 'prompt' string"
            )
        else:
            ids = self.tokenizer(row["prompt"])["input_ids"]
        if not ids:
            raise SettingError(f"{where} encodes to no tokens; remove the row or write its prompt")
        return ids

    def _chat_ids(self, row: dict, where: str) -> list[int]:
        messages = self.prompt_messages(row)
        try:
            ids = self.render(messages, tokenize=True)
            self._check_rendered(messages, where)
        except jinja2.TemplateError as err:
            raise SettingError(f"{where}: the tokenizer's chat template refused its messages ({err}); fix the "
                             "row's roles/order or use a tokenizer whose template accepts them") from None
        return ids

    def _check_rendered(self, messages: list[dict], where: str) -> None:
        """Refuse a message with an uncommon role that the chat template leaves out of its output
        (many templates render only system/user/assistant and drop the rest without a word)."""
        unusual = [m for m in messages
                   if m.get("role") not in COMMON_ROLES and str(m.get("content") or "").strip()]
        if not unusual:
            return
        text = self.render(messages, tokenize=False)
        for message in unusual:
            if str(message["content"]).strip() not in text:
                raise SettingError(
                    f"{where}: the chat template drops messages with role {message.get('role')!r} (their "
                    f"text is not in its output); use a role it renders ({', '.join(COMMON_ROLES)})"
                )

    def rows(self, rows: list[dict], split: str, names: Sequence[str] | None = None) -> list[dict]:
        """Records of ``rows``; ``names[i]`` says which row ``i`` is in messages (default
        "``split`` row i"). Over-long rows follow ``over_long``; :attr:`skipped` counts those dropped."""
        out = []
        self.skipped = 0
        for index, source_row in enumerate(rows):
            where = names[index] if names is not None else f"{split} row {index}"
            # A copy without the reference turn, so a method that annotates its batch's rows does not
            # edit the source's own dicts.
            row, reference = split_reference(dict(source_row), where)
            ids = self.prompt_ids(row, where)
            if len(ids) > self.max_prompt_tokens:
                if self.over_long == "error":
                    raise SettingError(
                        f"{where} has a {len(ids)}-token prompt, longer than "
                        f"max_prompt_tokens={self.max_prompt_tokens}; raise max_prompt_tokens or set "
                        "over_long_prompts to 'truncate' or 'skip'"
                    )
                if self.over_long == "skip":
                    self.skipped += 1
                    continue
                ids = ids[-self.max_prompt_tokens :]  # keep the end: it holds the question and cue
            answer_ids = []
            if reference is not None:
                answer_ids = [*self.tokenizer(reference, add_special_tokens=False)["input_ids"], self.eos_id]
            if self.chat:
                row["prompt_messages"] = self.prompt_messages(row)
            out.append({"prompt_ids": ids, "answer": row.get("answer"), "answer_ids": answer_ids,
                        "row_index": index, "row": row})
        if rows and not out:
            raise SettingError(f"every {split} prompt ({len(rows)}) was skipped as longer than "
                             f"max_prompt_tokens={self.max_prompt_tokens}; raise max_prompt_tokens")
        return out

    @property
    def eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos[0] if isinstance(eos, (list, tuple)) else eos


@runtime_checkable
class PromptConsumer(Protocol):
    """A LightningModule that wants the encoded prompts (every lit_opd method): the datamodule's
    ``setup`` hands it the encoder and the training / validation records once."""

    def connect_prompts(self, encoder: PromptTokenizer, train_rows: list[dict], val_rows: list[dict]) -> None:
        ...


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → ids and attention mask (B, P), left padded so every row's last token sits in the
    last column (generation appends there)."""
    P = max(len(r) for r in rows)
    ids_BP = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids_BP[i, P - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask_BP[i, P - len(r) :] = 1
    return ids_BP.to(device), mask_BP.to(device)


def collate_prompts(records: list[dict], pad_id: int) -> PromptBatch:
    """Left-padded prompts (:func:`left_pad`) with their answers and source rows."""
    ids_BP, mask_BP = left_pad([r["prompt_ids"] for r in records], pad_id)
    return PromptBatch(
        prompt_ids_BP=ids_BP,
        prompt_mask_BP=mask_BP,
        answers=[r["answer"] for r in records],
        answer_ids=[r["answer_ids"] for r in records],
        row_index_B=torch.tensor([r["row_index"] for r in records], dtype=torch.long),
        # A record built by hand (raw text, no prompt source) has no source row.
        rows=[r.get("row", {}) for r in records],
    )


def eos_ids(tokenizer) -> list[int]:  # noqa: ANN001
    """The tokenizer's EOS id(s) as a list (some tokenizers name several)."""
    ids = tokenizer.eos_token_id
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


def decode_completions(tokenizer, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> list[str]:  # noqa: ANN001
    """Completion texts: padding and tokens after a row's end blanked, special tokens dropped."""
    ids_BT = ids_BT.masked_fill(~mask_BT, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids_BT.tolist(), skip_special_tokens=True)


class ChatPrefix(str):
    """A prompt and the response so far, for a text-only teacher, with the chat structure kept.

    As a string it is the text as the student saw it: the rendered prompt (chat template, special
    tokens included) followed by ``response`` — what a completions-mode teacher continues. A chat-mode
    teacher sends ``messages`` (the conversation, roles kept, the reference answer left out) and asks
    for the rest of ``response`` instead of one flattened user message. Every place that takes a plain
    prefix string takes a ChatPrefix too.
    """

    messages: list[dict]
    response: str

    def __new__(cls, text: str, messages: list[dict], response: str = "") -> ChatPrefix:
        prefix = super().__new__(cls, text)
        prefix.messages, prefix.response = [dict(m) for m in messages], response
        return prefix

    def __reduce__(self):  # noqa: ANN204 - keep the structure across processes
        return type(self), (str(self), self.messages, self.response)

    @classmethod
    def of(cls, tokenizer, prompt_ids: list[int], row: dict, response: str = "") -> ChatPrefix:  # noqa: ANN001
        """The prefix of a batch row: its prompt ids (decoded with their special tokens when the chat
        template rendered them) and source ``row`` (``prompt_messages``, else its prompt as a user turn),
        followed by ``response``, the text the student has generated so far."""
        messages = row.get("prompt_messages")
        text = tokenizer.decode(prompt_ids, skip_special_tokens=messages is None)
        if messages is None:
            messages = row.get("messages") or [{"role": "user", "content": row.get("prompt", text)}]
        return cls(text + response, messages, response)



def dataset_completions(batch: PromptBatch, pad_id: int) -> RolloutBatch:
    """Reference answers as completions (GKD's supervised branch, SFT)."""
    if any(not ids for ids in batch.answer_ids):
        missing = [int(i) for i, ids in zip(batch.row_index_B, batch.answer_ids) if not ids]
        raise SettingError(
            f"Prompt rows {missing[:5]} have no 'answer', but this step needs dataset completions "
            "(lmbda < 1 or SFT); add answers or set lmbda=1"
        )
    T = max(len(ids) for ids in batch.answer_ids)
    device = batch.prompt_ids_BP.device
    ids_BT = torch.full((len(batch.answer_ids), T), pad_id, dtype=torch.long, device=device)
    mask_BT = torch.zeros_like(ids_BT, dtype=torch.bool)
    for i, ids in enumerate(batch.answer_ids):
        ids_BT[i, : len(ids)] = torch.tensor(ids, device=device)
        mask_BT[i, : len(ids)] = True
    return RolloutBatch(
        prompt_ids_BP=batch.prompt_ids_BP,
        prompt_mask_BP=batch.prompt_mask_BP,
        completion_ids_BT=ids_BT,
        completion_mask_BT=mask_BT,
        sampler_logp_BT=None,
        answers=list(batch.answers),
        row_index_B=batch.row_index_B,
        source="dataset",
        truncated_B=torch.zeros(len(batch.answer_ids), dtype=torch.bool, device=device),
        rows=list(batch.rows),
    )
