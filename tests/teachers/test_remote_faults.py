"""Fault tests of RemoteCalls. A fault-injecting proxy sits between it and a tiny OpenAI-style upstream
and makes the server slow, failing, rate-limited, malformed, dropped or absent. Each test checks that the
call still ends within a bounded time, with the right answer or ``None``, the right counters, and the API key
kept out of logs, messages and pickles. Timeouts are 0.5 s and backoffs 0.01 s, so each test takes ~1 s."""

from __future__ import annotations

import logging
import pickle
import threading
import time
import urllib.request

import openai  # noqa: F401 - imported up front, so the timings below measure calls, not the import
import pytest

from lit_opd.teachers.remote import COUNTERS, MalformedAnswer, RemoteCalls
from tests.teachers.fault_proxy import fault_proxy, tiny_upstream
from tests.teachers.servers import free_port

FAST = {"timeout": 0.5, "retries": 3, "backoff": 0.01, "max_backoff": 0.05}
SECRET = "sk-secret-123"


@pytest.fixture
def upstream():
    with tiny_upstream() as served:
        yield served


@pytest.fixture
def proxy(upstream):
    with fault_proxy(upstream.root) as running:
        yield running


def remote_for(root: str, **overrides) -> RemoteCalls:
    """A RemoteCalls on ``root`` (a server root, without /v1) with the fast test settings."""
    return RemoteCalls(base_url=root + "/v1", owner="TestTeacher", **{**FAST, **overrides})


def complete(client, prompt: str = "x"):  # noqa: ANN001, ANN201 - openai client in, Completion out
    """One completion, refused as MalformedAnswer unless it carries ``choices[0].text``."""
    answer = client.completions.create(model="m", prompt=prompt, max_tokens=1)
    try:
        text = answer.choices[0].text
    except (AttributeError, IndexError, TypeError) as err:
        raise MalformedAnswer(f"no choices[0].text in the answer: {answer!r}"[:200]) from err
    if not isinstance(text, str):
        raise MalformedAnswer(f"choices[0].text is {type(text).__name__}, not str")
    return answer


def text_of(answer) -> str:  # noqa: ANN001
    return answer.choices[0].text


def used_tokens(answer) -> int:  # noqa: ANN001
    return answer.usage.total_tokens


def counts(remote: RemoteCalls, *names: str) -> dict[str, int]:
    stats = remote.stats()
    return {name: int(stats[name]) for name in names}


def timed(fn, *args):  # noqa: ANN001, ANN201
    """``fn(*args)`` and the seconds it took."""
    start = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - start


def warnings_in(caplog) -> list[str]:  # noqa: ANN001
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ----- retried faults: answered in the end ----------------------------------------------------------
def test_slow_server_times_out_then_answers(proxy):
    proxy.plan([("slow", 3.0)], path="/completions")
    remote = remote_for(proxy.root)
    answer, seconds = timed(remote.call, complete)
    assert text_of(answer) == "echo:x"
    assert counts(remote, "timeouts", "retries", "calls", "failed") == {
        "timeouts": 1, "retries": 1, "calls": 2, "failed": 0}
    assert 0.45 < seconds < 2.0  # gave up after the 0.5 s timeout, did not wait out the 3 s


def test_http_500_then_answers(proxy):
    proxy.plan([("status", 500)])
    remote = remote_for(proxy.root)
    assert text_of(remote.call(complete)) == "echo:x"
    assert counts(remote, "http_5xx", "retries", "failed") == {"http_5xx": 1, "retries": 1, "failed": 0}
    assert proxy.seen == 2


@pytest.mark.parametrize(("retry_after", "max_backoff", "low", "high"), [
    (0.3, 1.0, 0.28, 0.9),  # honoured
    (30, 0.2, 0.15, 0.9),  # capped by max_backoff
], ids=["honoured", "capped"])
def test_http_429_waits_for_retry_after(proxy, retry_after, max_backoff, low, high):
    proxy.plan([("status", 429, retry_after)])
    remote = remote_for(proxy.root, max_backoff=max_backoff)
    answer, seconds = timed(remote.call, complete)
    assert text_of(answer) == "echo:x"
    assert counts(remote, "http_429", "retries") == {"http_429": 1, "retries": 1}
    assert low < seconds < high


@pytest.mark.parametrize("fault", ["malformed", "wrong_shape", ("wrong_shape", {"choices": []})],
                         ids=["not-json", "no-choices", "empty-choices"])
def test_malformed_answer_is_retried(proxy, fault):
    proxy.plan([fault])
    remote = remote_for(proxy.root)
    assert text_of(remote.call(complete)) == "echo:x"
    assert counts(remote, "malformed", "retries", "failed") == {"malformed": 1, "retries": 1, "failed": 0}


def test_a_bug_in_the_request_callable_raises_instead_of_counting_as_no_answer(proxy):
    """Only bodies rejected as malformed are retried; our own code's errors must not be swallowed."""
    remote = remote_for(proxy.root)

    def buggy(client):  # noqa: ANN001, ANN202
        complete(client)
        return None + 1  # a TypeError in the caller's parsing

    with pytest.raises(TypeError):
        remote.call(buggy)
    assert counts(remote, "malformed", "failed", "retries") == {"malformed": 0, "failed": 0, "retries": 0}


def test_dropped_connection_is_retried(proxy):
    proxy.plan(["drop", "drop"])
    remote = remote_for(proxy.root)
    assert text_of(remote.call(complete)) == "echo:x"
    assert counts(remote, "connection_errors", "retries") == {"connection_errors": 2, "retries": 2}


# ----- faults that end in no answer -----------------------------------------------------------------
def test_persistent_500_gives_none_after_all_attempts(proxy, caplog):
    proxy.plan([("status", 500)] * 10)
    remote = remote_for(proxy.root, retries=2)
    answer, seconds = timed(remote.call, complete)
    assert answer is None
    assert proxy.seen == 3  # retries + 1
    assert counts(remote, "failed", "http_5xx", "retries", "calls") == {
        "failed": 1, "http_5xx": 3, "retries": 2, "calls": 3}
    assert seconds < 2.0
    [warning] = warnings_in(caplog)
    assert proxy.root + "/v1" in warning and "3 attempt(s)" in warning


def test_http_400_is_not_retried(proxy):
    proxy.plan([("status", 400)] * 3)
    remote = remote_for(proxy.root)
    assert remote.call(complete) is None
    assert proxy.seen == 1
    assert counts(remote, "http_4xx", "retries", "failed") == {"http_4xx": 1, "retries": 0, "failed": 1}


def test_server_down_fails_check_naming_the_url():
    root = f"http://127.0.0.1:{free_port()}"
    remote = remote_for(root)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="cannot reach") as info:
        remote.check("m")
    assert root + "/v1" in str(info.value)
    assert remote.call(complete) is None
    assert time.monotonic() - start < 5.0
    assert counts(remote, "connection_errors", "failed") == {"connection_errors": 4, "failed": 1}


def test_check_lists_what_the_server_serves(proxy):
    remote = remote_for(proxy.root)
    remote.check("m")
    with pytest.raises(RuntimeError, match=r"does not serve model 'other'; it serves \['m'\]"):
        remote.check("other")


@pytest.mark.parametrize(("fault", "message"), [
    (("status", 500), "answered HTTP 500"),
    ("malformed", "not an OpenAI model list"),
    ("drop", "cannot reach"),
], ids=["http-500", "not-json", "dropped"])
def test_check_turns_a_bad_model_list_into_one_clear_error(proxy, fault, message):
    proxy.plan([fault], path="/models")
    with pytest.raises(RuntimeError, match=message) as info:
        remote_for(proxy.root).check("m")
    assert proxy.root + "/v1" in str(info.value)


# ----- budget and concurrency -----------------------------------------------------------------------
def test_call_budget_refuses_further_calls_with_one_warning(proxy, caplog):
    remote = remote_for(proxy.root, max_calls=2)
    answers = [remote.call(complete) for _ in range(4)]
    assert [a is not None for a in answers] == [True, True, False, False]
    assert proxy.seen == 2
    assert counts(remote, "calls", "budget_refused", "failed") == {
        "calls": 2, "budget_refused": 2, "failed": 0}
    assert len([w for w in warnings_in(caplog) if "budget" in w]) == 1


def test_token_budget_counts_reported_usage(proxy):
    remote = remote_for(proxy.root, max_tokens=3)
    answers = [remote.call(complete, tokens=used_tokens) for _ in range(3)]
    assert [a is not None for a in answers] == [True, True, False]  # 2 tokens each; 4 >= 3 after two
    assert counts(remote, "tokens", "budget_refused") == {"tokens": 4, "budget_refused": 1}


def test_map_keeps_concurrency_and_item_order():
    with tiny_upstream(delay_s=0.15) as upstream, fault_proxy(upstream.root) as proxy:
        proxy.plan([("slow", 0.3)], path="/completions")  # the first request sent finishes last
        remote = remote_for(proxy.root, concurrency=2, timeout=3.0)
        answers, seconds = timed(remote.map, lambda client, item: complete(client, f"item {item}"), range(8))
        assert [text_of(a) for a in answers] == [f"echo:item {i}" for i in range(8)]
        assert upstream.max_in_flight == 2 and proxy.max_in_flight == 2
        assert seconds < 8 * 0.15 + 0.3  # faster than one at a time
        assert counts(remote, "calls", "retries") == {"calls": 8, "retries": 0}


# ----- the API key ----------------------------------------------------------------------------------
def test_key_reaches_the_server_and_nothing_else(upstream, proxy, monkeypatch, caplog):
    monkeypatch.setenv("MY_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    remote = remote_for(proxy.root, api_key_env="MY_KEY", retries=1)
    assert remote.call(complete) is not None
    assert upstream.auth_seen[-1] == f"Bearer {SECRET}"
    proxy.plan([("status", 500)] * 2)
    assert remote.call(complete) is None
    upstream.fail_with = 401  # its error message quotes the key it received, as some APIs do
    assert remote.call(complete) is None
    assert any("***" in w for w in warnings_in(caplog))  # the quoted key was redacted, not dropped
    assert SECRET not in caplog.text
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    assert SECRET.encode() not in pickle.dumps(remote)
    assert SECRET not in repr(remote) and SECRET not in str(remote.stats())


def test_key_absent_from_a_down_server_error(monkeypatch):
    monkeypatch.setenv("MY_KEY", SECRET)
    remote = remote_for(f"http://127.0.0.1:{free_port()}", api_key_env="MY_KEY")
    with pytest.raises(RuntimeError) as info:
        remote.check("m")
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)


def test_unset_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(ValueError, match="api_key_env='MY_KEY'"):
        remote_for("http://127.0.0.1:1", api_key_env="MY_KEY")


# ----- pickling and the proxy itself ----------------------------------------------------------------
def test_pickled_after_use_calls_again(proxy):
    remote = remote_for(proxy.root)
    assert remote.call(complete) is not None
    copy = pickle.loads(pickle.dumps(remote))
    assert text_of(copy.call(complete)) == "echo:x"  # its client is rebuilt on first use
    assert [text_of(a) for a in copy.map(complete, ["a", "b"])] == ["echo:a", "echo:b"]
    assert counts(copy, "calls") == {"calls": 4} and counts(remote, "calls") == {"calls": 1}
    assert set(copy.stats()) == set(COUNTERS)


def test_proxy_stops_quickly_with_a_request_held():
    with tiny_upstream() as upstream:
        with fault_proxy(upstream.root) as proxy:
            proxy.plan([("slow", 30.0)])
            request = threading.Thread(target=_get_quietly, args=(proxy.root + "/health",), daemon=True)
            request.start()
            while proxy.seen == 0:
                time.sleep(0.01)
            start = time.monotonic()
        assert time.monotonic() - start < 1.0
        request.join(timeout=2.0)
        assert not request.is_alive()


def _get_quietly(url: str) -> None:
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except OSError:
        pass
