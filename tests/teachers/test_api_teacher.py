"""APITeacher against a real OpenAI-compatible server: `transformers serve` running the trained
addition teacher on loopback (it answers "a+b=" with the reversed sum, e.g. "63+4=" -> "76").

One server for the module (start-up is most of the file's time). It serves a copy of the teacher whose
tokenizer has a chat template, so the same server answers both /v1/completions and /v1/chat/completions.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("openai", reason="APITeacher needs the openai SDK: pip install 'lit_opd[remote]'")
pytest.importorskip("fastapi", reason="the test server needs transformers[serving]: pip install lit_opd[dev]")

from lit_opd.teachers.api import APITeacher, continue_messages  # noqa: E402
from tests.teachers.servers import free_port, running_server  # noqa: E402

TEACHER = Path(__file__).resolve().parents[2] / "lit_opd" / "assets" / "addition" / "teacher"
GREEDY = {"63+4=": "76", "12+3=": "51", "99+1=": "001"}  # reversed sums
SECRET = "sk-test-0123456789abcdef-do-not-leak"
FAST = {"retries": 1, "backoff": 0.01, "timeout": 10.0}  # failures in this file should cost little time

# The chat template hands the model only the last line of the last message: the prefix that
# continue_messages puts there, which is what this teacher was trained to continue. The response
# template says where the reply starts and ends (without one, serve falls back to Qwen's markers,
# which this character tokenizer does not use, and returns the prompt with the reply).
CHAT_TEMPLATE = "{{ messages[-1]['content'].split('\\n')[-1] }}"
RESPONSE_TEMPLATE = {"defaults": {"role": "assistant"}, "start_anchor": "=",
                     "fields": {"content": {"close_pattern": "<eos>", "content": "text"}}}


def _serve_argv(model_dir: Path, port: int) -> list[str]:
    """`transformers serve` from this interpreter's environment (the CLI script next to python)."""
    script = Path(sys.executable).parent / "transformers"
    if not script.exists():
        pytest.skip(f"no `transformers` CLI next to {sys.executable}: pip install 'lit_opd[dev]'")
    return [str(script), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
            "--device", "cpu", "--log-level", "warning"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base_url, model name) of the trained teacher served on loopback."""
    model_dir = tmp_path_factory.mktemp("served") / "teacher"
    shutil.copytree(TEACHER, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(chat_template=CHAT_TEMPLATE, response_template=RESPONSE_TEMPLATE)
    config_path.write_text(json.dumps(config, indent=2))
    port = free_port()
    with running_server(_serve_argv(model_dir, port), port) as root:
        yield root + "/v1", str(model_dir)


def _teacher(served, **kwargs) -> APITeacher:
    base_url, model = served
    return APITeacher(base_url, model, **{**FAST, **kwargs})


def _down_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there


# ----- answers ------------------------------------------------------------------------------------
def test_completions_greedy_gives_the_trained_answers(served):
    teacher = _teacher(served, stop=["1"])
    teacher.connect()
    plain = _teacher(served)
    texts = plain.generate_text(list(GREEDY), max_new_tokens=6, temperature=0.0)
    assert texts == [[answer] for answer in GREEDY.values()]
    # "001" is cut before the stop string, whether or not the server applies it
    assert teacher.generate_text(["99+1="], max_new_tokens=6, temperature=0.0) == [["00"]]
    assert plain.stats()["tokens"] > 0 and plain.stats()["failed"] == 0


def test_server_that_ignores_n_is_topped_up_then_asked_per_sample(served):
    teacher = _teacher(served)
    prompts = ["63+4=", "12+3="]
    texts = teacher.generate_text(prompts, max_new_tokens=6, num_samples=3, temperature=1.0, seed=5)
    assert [len(row) for row in texts] == [3, 3]
    assert all(t is not None and t.isdigit() for row in texts for t in row), texts
    stats = teacher.stats()
    # one n=3 request per prompt, one choice back each, two top-ups per prompt
    assert (stats["calls"], stats["n_ignored"], stats["topup_requests"]) == (6, 1, 4)
    assert stats["unanswered_samples"] == 0
    teacher.generate_text(prompts, max_new_tokens=6, num_samples=3, temperature=1.0)
    assert teacher.stats()["calls"] == 12 and teacher.stats()["topup_requests"] == 4  # per sample from now on
    single = _teacher(served, n_per_request=False)
    assert [len(r) for r in single.generate_text(prompts, 6, num_samples=2)] == [2, 2]
    assert single.stats()["n_ignored"] == 0 and single.stats()["calls"] == 4


def test_chat_mode_sends_the_prefix_and_returns_the_reply(served):
    teacher = _teacher(served, mode="chat", system_prompt="You continue arithmetic.")
    assert continue_messages("63+4=", teacher.continue_instruction, None)[-1]["content"].endswith("\n\n63+4=")
    texts = teacher.generate_text(["63+4=", "12+3="], max_new_tokens=6, num_samples=2, temperature=0.0)
    assert texts == [["76", "76"], ["51", "51"]]
    assert teacher.identity()["mode"] == "chat"


def test_restored_stats_keep_counting_and_skip_the_n_probe(served):
    first = _teacher(served)
    first.generate_text(["63+4="], 6, num_samples=2)
    resumed = _teacher(served)
    resumed.restore_stats(pickle.loads(pickle.dumps(first.stats())))
    resumed.generate_text(["63+4="], 6, num_samples=2)
    stats = resumed.stats()
    assert stats["calls"] == first.stats()["calls"] + 2 and stats["topup_requests"] == 1


# ----- budget and failures ------------------------------------------------------------------------
def test_spent_budget_gives_no_answer_not_an_error(served):
    by_calls = _teacher(served, max_calls=2, concurrency=1)
    texts = by_calls.generate_text(list(GREEDY), max_new_tokens=6, temperature=0.0)
    assert texts == [["76"], ["51"], [None]]
    stats = by_calls.stats()
    assert (stats["calls"], stats["budget_refused"], stats["unanswered_samples"]) == (2, 1, 1)
    # "63+4=" + "76<eos>" = 8 tokens by the server's count; the second request passes 10, the third is refused
    by_tokens = _teacher(served, max_total_tokens=10, concurrency=1)
    assert by_tokens.generate_text(list(GREEDY), 6, temperature=0.0) == [["76"], ["51"], [None]]
    assert by_tokens.stats()["tokens"] == 16 and by_tokens.stats()["budget_refused"] == 1


def test_server_down_fails_connect_fast_and_generate_gives_none():
    url = _down_url()
    teacher = APITeacher(url, "any-model", **FAST)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=f"cannot reach the teacher server at {url}"):
        teacher.connect()
    texts = teacher.generate_text(["63+4=", "12+3="], max_new_tokens=4, num_samples=2)
    assert time.monotonic() - start < 10
    assert texts == [[None, None], [None, None]]
    stats = teacher.stats()
    assert stats["failed"] == 2 and stats["connection_errors"] == 4 and stats["unanswered_samples"] == 4


def test_score_is_refused_naming_the_alternatives(served):
    with pytest.raises(NotImplementedError, match="ServerTeacher.*HFTeacher"):
        _teacher(served).score(None)


# ----- the key never leaks ------------------------------------------------------------------------
def test_api_key_never_leaks(served, monkeypatch, caplog):
    monkeypatch.setenv("LIT_OPD_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    teacher = _teacher(served, api_key_env="LIT_OPD_TEST_KEY")
    assert teacher.generate_text(["63+4="], 6, temperature=0.0) == [["76"]]  # the client holds the key now
    wrong = APITeacher(served[0], "not-the-served-model", api_key_env="LIT_OPD_TEST_KEY", **FAST)
    assert wrong.generate_text(["63+4="], 6) == [[None]] and wrong.stats()["http_4xx"] == 1
    down = APITeacher(_down_url(), "m", api_key_env="LIT_OPD_TEST_KEY", **FAST)
    with pytest.raises(RuntimeError) as err:
        down.connect()
    assert down.generate_text(["63+4="], 4) == [[None]]
    assert any("no answer" in r.getMessage() for r in caplog.records)  # the failures were logged
    state = {k: v for k, v in vars(teacher.calls).items() if k != "_client"}
    exposed = [repr(teacher), json.dumps(teacher.identity()), repr(vars(teacher)), repr(state),
               str(err.value), caplog.text, *(r.getMessage() for r in caplog.records)]
    assert all(SECRET not in text for text in exposed)
    for pickled in (pickle.dumps(teacher), pickle.dumps(wrong), pickle.dumps(down)):
        assert SECRET.encode() not in pickled
    revived = pickle.loads(pickle.dumps(teacher))
    assert revived.generate_text(["12+3="], 6, temperature=0.0) == [["51"]]  # key read again from the env


# ----- configuration errors -----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, setting", [
    ({"mode": "completion"}, "APITeacher.mode"),
    ({"base_url": "127.0.0.1:8000/v1"}, "APITeacher.base_url"),
    ({"api_key_env": "LIT_OPD_UNSET_KEY"}, "APITeacher.api_key_env"),
    ({"max_tokens": 0}, "APITeacher.max_tokens"),
    ({"max_total_tokens": 0}, "APITeacher.max_total_tokens"),
    ({"temperature": -1.0}, "APITeacher.temperature"),
    ({"stop": ["\n", ""]}, "APITeacher.stop"),
    ({"model": ""}, "APITeacher.model"),
    ({"concurrency": 0}, "APITeacher.concurrency"),
])
def test_bad_settings_name_the_setting(kwargs, setting, monkeypatch):
    monkeypatch.delenv("LIT_OPD_UNSET_KEY", raising=False)
    settings = {"base_url": "http://127.0.0.1:8000/v1", "model": "m", **kwargs}
    with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
        APITeacher(**settings)


def test_bad_generate_arguments_are_refused():
    teacher = APITeacher("http://127.0.0.1:8000/v1", "m")
    with pytest.raises(ValueError, match="num_samples"):
        teacher.generate_text(["1+1="], max_new_tokens=4, num_samples=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        teacher.generate_text(["1+1="], max_new_tokens=0)


def test_the_shipped_config_block_builds_a_teacher(monkeypatch):
    """configs/teachers/api.yaml (a block to paste into a method config) names real settings."""
    import importlib

    import yaml

    block = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/teachers/api.yaml").read_text())
    module, _, name = block["teacher"]["class_path"].rpartition(".")
    args = block["teacher"]["init_args"]
    monkeypatch.setenv(args["api_key_env"], SECRET)
    teacher = getattr(importlib.import_module(module), name)(**args)
    assert isinstance(teacher, APITeacher) and teacher.identity()["mode"] == "chat"
