"""Prompt rows → token ids (chat template, length limit) and left-padded PromptBatches."""

from __future__ import annotations

from collections.abc import Sequence

import jinja2
import torch

from lit_opd.types import PromptBatch

# Roles every chat template renders; a message with another role is checked to appear in the output.
COMMON_ROLES = ("system", "user", "assistant")


class PromptTokenizer:
    """Turns source rows into ``{"prompt_ids", "answer", "answer_ids", "row_index", "row"}`` records;
    ``row`` is a shallow copy of the source row, so fields the encoder does not read (a ranking's
    ``candidates``, a ``domain``, ...) still reach the method through the batch."""

    def __init__(
        self,
        tokenizer,  # noqa: ANN001 - any transformers tokenizer
        max_prompt_tokens: int,
        over_long: str,
        use_chat_template: bool | None,
        system_prompt: str | None,
    ) -> None:
        if over_long not in ("error", "truncate", "skip"):
            raise ValueError(f"over_long_prompts={over_long!r}: use 'error', 'truncate' or 'skip'")
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template; set it to false")
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.over_long = over_long
        self.chat = has_template if use_chat_template is None else use_chat_template
        self.system_prompt = system_prompt
        self.skipped = 0  # over-long rows the last ``rows`` call dropped (over_long="skip")

    def prompt_ids(self, row: dict, where: str) -> list[int]:
        if "prompt" in row and "messages" in row:
            raise ValueError(
                f"{where} has both 'prompt' and 'messages'; keep one (which one is used would depend on "
                "whether the tokenizer has a chat template)"
            )
        if row.get("prompt") == "":
            raise ValueError(f"{where} has an empty 'prompt'; remove the row or write its prompt")
        if self.chat:
            ids = self._chat_ids(row, where)
        elif "prompt" not in row:
            raise ValueError(
                f"{where} has 'messages' but the chat template is off; set use_chat_template: true "
                "with a tokenizer that has one, or give a 'prompt' string"
            )
        else:
            ids = self.tokenizer(row["prompt"])["input_ids"]
        if not ids:
            raise ValueError(f"{where} encodes to no tokens; remove the row or write its prompt")
        return ids

    def _chat_ids(self, row: dict, where: str) -> list[int]:
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        if self.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        try:
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            self._check_rendered(messages, where)
        except jinja2.TemplateError as err:
            raise ValueError(f"{where}: the tokenizer's chat template refused its messages ({err}); fix the "
                             "row's roles/order or use a tokenizer whose template accepts them") from None
        # transformers 5 returns a BatchEncoding here, older versions a list.
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def _check_rendered(self, messages: list[dict], where: str) -> None:
        """Refuse a message with an uncommon role that the chat template leaves out of its output
        (many templates render only system/user/assistant and drop the rest without a word)."""
        unusual = [m for m in messages
                   if m.get("role") not in COMMON_ROLES and str(m.get("content") or "").strip()]
        if not unusual:
            return
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        for message in unusual:
            if str(message["content"]).strip() not in text:
                raise ValueError(
                    f"{where}: the chat template drops messages with role {message.get('role')!r} (their "
                    f"text is not in its output); use a role it renders ({', '.join(COMMON_ROLES)})"
                )

    def rows(self, rows: list[dict], split: str, names: Sequence[str] | None = None) -> list[dict]:
        """Records of ``rows``; ``names[i]`` says which row ``i`` is in messages (default
        "``split`` row i"). Over-long rows follow ``over_long``; :attr:`skipped` counts those dropped."""
        out = []
        self.skipped = 0
        for index, row in enumerate(rows):
            where = names[index] if names is not None else f"{split} row {index}"
            ids = self.prompt_ids(row, where)
            if len(ids) > self.max_prompt_tokens:
                if self.over_long == "error":
                    raise ValueError(
                        f"{where} has a {len(ids)}-token prompt, longer than "
                        f"max_prompt_tokens={self.max_prompt_tokens}; raise max_prompt_tokens or set "
                        "over_long_prompts to 'truncate' or 'skip'"
                    )
                if self.over_long == "skip":
                    self.skipped += 1
                    continue
                ids = ids[-self.max_prompt_tokens :]  # keep the end: it holds the question and cue
            answer = row.get("answer")
            answer_ids = []
            if answer is not None:
                answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
                answer_ids = [*answer_ids, self.eos_id]
            record = {"prompt_ids": ids, "answer": answer, "answer_ids": answer_ids, "row_index": index}
            # A copy, so a method that annotates its batch's rows does not edit the source's own dicts.
            out.append({**record, "row": dict(row)})
        if rows and not out:
            raise ValueError(f"every {split} prompt ({len(rows)}) was skipped as longer than "
                             f"max_prompt_tokens={self.max_prompt_tokens}; raise max_prompt_tokens")
        return out

    @property
    def eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos[0] if isinstance(eos, (list, tuple)) else eos


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
