"""Text-only teachers get the student's prompt with its chat structure: the conversation (roles kept)
in chat mode, the rendered prompt text (special tokens kept) in completions mode."""

from __future__ import annotations

import pickle

from lit_opd import HFTextTeacher
from lit_opd.rollout.prompts import ChatPrefix, PromptTokenizer, collate_prompts
from lit_opd.tasks import char_tokenizer
from lit_opd.teachers.api import RESUME_INSTRUCTION, continue_messages
from tests.helpers import make_tiny_model

ROW = {"messages": [{"role": "user", "content": "347+85="}, {"role": "assistant", "content": "432"}]}


def _prefix(response: str) -> ChatPrefix:
    """The prefix a method builds from a batch row: its prompt ids and row, then the response so far."""
    tok = char_tokenizer(chat_template=True)
    records = PromptTokenizer(tok, 512, "error", None, "Be brief.").rows([ROW], "training")
    batch = collate_prompts(records, tok.pad_token_id)
    ids = batch.prompt_ids_BP[0][batch.prompt_mask_BP[0].bool()].tolist()
    return ChatPrefix.of(tok, ids, batch.rows[0], response)


def test_completions_mode_text_keeps_the_rendered_roles():
    prefix = _prefix("43")
    # Not "system: Be brief.user: 347+85=assistant: 43": the template's special tokens stay.
    assert prefix == "<bos>system: Be brief.<eos><bos>user: 347+85=<eos><bos>assistant: 43"
    assert "432" not in prefix  # the reference answer is never part of the prompt


def test_chat_mode_sends_the_conversation_then_asks_to_go_on():
    messages = continue_messages(_prefix("43"), "ignored for a ChatPrefix", system_prompt="Teacher.")
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "347+85="},
                        {"role": "assistant", "content": "43"},
                        {"role": "user", "content": RESUME_INSTRUCTION}]
    # With no response yet the teacher simply answers the conversation; its own system prompt goes
    # first when the conversation has none.
    bare = ChatPrefix("347+85=", [{"role": "user", "content": "347+85="}])
    assert continue_messages(bare, "x", "Teacher.") == [{"role": "system", "content": "Teacher."},
                                                         {"role": "user", "content": "347+85="}]


def test_plain_string_prefixes_are_asked_as_before():
    assert continue_messages("12+3=", "Go on.", None) == [{"role": "user", "content": "Go on.\n\n12+3="}]


def test_a_chat_prefix_survives_pickling_and_string_use():
    prefix = _prefix("4")
    copy = pickle.loads(pickle.dumps(prefix))
    assert isinstance(copy, ChatPrefix) and copy == prefix and copy.messages == prefix.messages
    assert copy.response == "4" and (prefix + "3").endswith("assistant: 43")


def test_hf_text_teacher_in_chat_mode_renders_the_conversation_with_roles():
    tok = char_tokenizer(chat_template=True)
    teacher = HFTextTeacher(make_tiny_model(len(tok), 16, 1, seed=0), tokenizer=tok, chat=True)
    rendered = teacher._render(_prefix("43"))
    assert rendered == ("<bos>system: Be brief.<eos><bos>user: 347+85=<eos><bos>assistant: 43<eos>"
                        f"<bos>user: {RESUME_INSTRUCTION}<eos><bos>assistant: ")
    out = teacher.generate_text([_prefix("43")], max_new_tokens=2, num_samples=1, temperature=0.0)
    assert len(out) == 1 and isinstance(out[0][0], str)
