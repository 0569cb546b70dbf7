"""The conversational format (a trailing assistant turn is the reference, never the prompt) in every
source, chat template overrides and template variables, and the prompt messages rows carry."""

from __future__ import annotations

import json

import pytest

from lit_opd import JsonlPrompts, ListPrompts, RolloutDataModule, SamplingParams, SFTModule, TaskPrompts
from lit_opd.rollout.prompts import dataset_completions
from lit_opd.rollout.prompts import PromptTokenizer, collate_prompts
from lit_opd.tasks import AdditionTask, char_tokenizer
from tests.helpers import make_trainer

ASSETS = "lit_opd/assets/addition"
CONTENT_ONLY = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # "347+85=" as the task's prompts
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "347+85="},
                     {"role": "assistant", "content": "ANSWER 432"}]}


def _encode(rows, **settings):
    tok = char_tokenizer(chat_template=True)
    encode = PromptTokenizer(tok, 512, "error", settings.pop("use_chat_template", None),
                             settings.pop("system_prompt", None), **settings)
    return tok, encode.rows(rows, "training")


def test_a_trailing_assistant_turn_is_the_reference_never_the_prompt():
    tok, [record] = _encode([CHAT])
    prompt = tok.decode(record["prompt_ids"])
    assert "ANSWER" not in prompt and prompt.endswith("<bos>user: 347+85=<eos><bos>assistant: ")
    assert record["answer"] == "ANSWER 432"
    assert tok.decode(record["answer_ids"]) == "ANSWER 432<eos>"  # the SFT / GKD target
    assert record["row"]["messages"] == CHAT["messages"][:2]
    assert len(CHAT["messages"]) == 3  # the source's own row is untouched
    target = dataset_completions(collate_prompts([record], tok.pad_token_id), tok.pad_token_id)
    assert tok.decode(target.completion_ids_BT[0]) == "ANSWER 432<eos>"


def test_an_answer_field_grades_while_the_assistant_turn_stays_the_target():
    tok, [record] = _encode([{**CHAT, "answer": "432"}])
    assert record["answer"] == "432" and tok.decode(record["answer_ids"]) == "ANSWER 432<eos>"


def test_trl_prompt_completion_rows_split_the_same_way():
    tok, records = _encode([
        {"prompt": [{"role": "user", "content": "1+1="}],
         "completion": [{"role": "assistant", "content": "2"}]},
        {"prompt": "2+2=", "completion": "4"},
        {"messages": [{"role": "user", "content": "3+3="}], "completion": "6"},
    ])
    assert tok.decode(records[0]["prompt_ids"]) == "<bos>user: 1+1=<eos><bos>assistant: "
    assert tok.decode(records[2]["prompt_ids"]) == "<bos>user: 3+3=<eos><bos>assistant: "
    assert [r["answer"] for r in records] == ["2", "4", "6"]
    assert tok.decode(records[1]["answer_ids"]) == "4<eos>"


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "assistant", "content": "4"}]}, "holds only an assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
     "the final assistant turn must be a non-empty text"),
])
def test_bad_conversational_rows_name_the_row(row, message):
    with pytest.raises(ValueError, match=f"training row 0: .*{message}"):
        _encode([row])


def test_every_source_splits_the_reference(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHAT) + "\n")
    for source in (JsonlPrompts(str(path)), ListPrompts([CHAT])):
        dm = RolloutDataModule(source, val_size=0, batch_size=1)
        dm.tokenizer = char_tokenizer(chat_template=True)
        dm.setup("fit")
        assert dm.train_rows[0]["answer"] == "ANSWER 432"
        assert "ANSWER" not in dm.tokenizer.decode(dm.train_rows[0]["prompt_ids"])


def test_a_chat_template_string_or_file_replaces_the_tokenizers(tmp_path):
    tok, [record] = _encode([{"prompt": "hi"}], chat_template="[{{ messages[0]['content'] }}]")
    assert tok.decode(record["prompt_ids"]) == "[hi]"
    (tmp_path / "t.jinja").write_text("<{{ messages[0]['content'] }}>")
    json_file = tmp_path / "chat_template.json"
    json_file.write_text(json.dumps({"chat_template": "({{ messages[0]['content'] }})"}))
    for path, rendered in ((tmp_path / "t.jinja", "<hi>"), (json_file, "(hi)")):
        [record] = _encode([{"prompt": "hi"}], chat_template=str(path))[1]
        assert tok.decode(record["prompt_ids"]) == rendered


def test_chat_template_kwargs_reach_the_template():
    template = "{% if enable_thinking %}<think>{% endif %}{{ messages[0]['content'] }}"
    tok, [off] = _encode([{"prompt": "hi"}], chat_template=template,
                         chat_template_kwargs={"enable_thinking": False})
    _, [on] = _encode([{"prompt": "hi"}], chat_template=template,
                      chat_template_kwargs={"enable_thinking": True})
    assert tok.decode(off["prompt_ids"]) == "hi" and tok.decode(on["prompt_ids"]) == "<think>hi"


@pytest.mark.parametrize("settings, error, message", [
    ({"chat_template": "nope.jinja"}, FileNotFoundError, "neither an existing file nor a Jinja template"),
    ({"chat_template_kwargs": {"tokenize": False}}, ValueError, "chat_template_kwargs.tokenize is set by"),
    ({"chat_template": "{{ x }}", "use_chat_template": False}, ValueError, "but use_chat_template is false"),
])
def test_bad_template_settings_are_refused(settings, error, message):
    with pytest.raises(error, match=message):
        _encode([{"prompt": "hi"}], **settings)


def test_rows_carry_the_rendered_prompt_messages():
    _, [record] = _encode([{"prompt": "1+1="}], system_prompt="Be brief.")
    assert record["row"]["prompt_messages"] == [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "1+1="}]
    _, [plain] = _encode([{"prompt": "1+1="}], use_chat_template=False)
    assert "prompt_messages" not in plain["row"]


def test_a_conversational_jsonl_trains_and_validates_through_a_template_override(tmp_path):
    """TRL conversational rows for a tokenizer without a chat template: the override renders them like
    the task's own prompts, SFT trains on the assistant turns and validation grades against them."""
    rows = AdditionTask(max_digits=3, reverse_answer=True).make_rows(24, seed=3)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["answer"]}]}) + "\n"
                            for r in rows))
    dm = RolloutDataModule(JsonlPrompts(str(path)), val_size=8, batch_size=4, chat_template=CONTENT_ONLY,
                           sampling=SamplingParams(max_new_tokens=6))
    module = SFTModule(f"{ASSETS}/teacher")  # trained to 100 %: a nonzero accuracy means the format is right
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=None)
    trainer.fit(module, dm)
    assert all(not any(ch.isalpha() for ch in dm.tokenizer.decode(r["prompt_ids"])) for r in dm.train_rows)
    [metrics] = trainer.validate(module, dm, verbose=False)
    assert metrics["val/accuracy"] > 0.5


def test_task_sources_are_unchanged():
    dm = RolloutDataModule(TaskPrompts(AdditionTask(), num_rows=4), val_size=0, batch_size=1)
    dm.tokenizer = char_tokenizer()
    dm.setup("fit")
    assert all(r["answer"] == r["row"]["answer"] for r in dm.train_rows)


def test_the_override_becomes_the_tokenizers_template_so_exports_carry_it(tmp_path):
    dm = RolloutDataModule(TaskPrompts(AdditionTask(), num_rows=4), val_size=0, batch_size=1,
                           chat_template=CONTENT_ONLY)
    dm.tokenizer = char_tokenizer()
    dm.setup("fit")
    assert dm.tokenizer.chat_template == CONTENT_ONLY
    dm.tokenizer.save_pretrained(tmp_path)  # what a checkpoint's tokenizer files and an export hold
    assert char_tokenizer().from_pretrained(tmp_path).chat_template == CONTENT_ONLY


def test_tool_replies_render_with_the_template_variables():
    from lit_opd.rollout.turns import tool_reply_ids

    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}<eos>{% endfor %}"
                         "{% if add_generation_prompt %}{% if brief %}b{% endif %}a:{% endif %}")
    assert tok.decode(tool_reply_ids(tok, "42", "ok")) == "t:ok<eos>a:"
    assert tok.decode(tool_reply_ids(tok, "42", "ok", {"brief": True})) == "t:ok<eos>ba:"
