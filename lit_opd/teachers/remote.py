"""Calls to one OpenAI-compatible server, made robust: timeouts, retries with backoff, a concurrency
limit, a per-run budget of calls and tokens, and counters. Shared by every remote teacher.

A call that still fails after its retries gives ``None`` ("no answer"): the teacher reports that
row or request as unanswered, the method skips its supervision and the run goes on. Retried:
timeouts, dropped connections, HTTP 429 and 5xx, and malformed bodies. Not retried (the same
request would fail again): other 4xx. The API key is read from the environment variable named by
``api_key_env`` and lives only inside the HTTP client; every message this module writes is passed
through :meth:`RemoteCalls.redact` first.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lit_opd.errors import SettingError, TeacherUnreachable

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

RETRIED = ("timeouts", "connection_errors", "http_429", "http_5xx", "malformed")
COUNTERS = ("calls", "retries", "failed", "budget_refused", "tokens", "http_4xx", *RETRIED)


class MalformedAnswer(ValueError):
    """The server answered, but not in the shape the request asked for (retried)."""


class RemoteCalls:
    """One server's client with the robustness every remote teacher needs.

    Args:
        base_url: the server's OpenAI-compatible root, e.g. ``http://127.0.0.1:8000/v1``.
        owner: the teacher's class name, for messages.
        api_key_env: *name* of the environment variable that holds the API key (None: the server
            needs no key). The key itself never enters a config, log, message or checkpoint.
        timeout: seconds one request may take before it counts as failed (and is retried).
        retries: further attempts after the first failed one.
        backoff: first retry waits ``backoff`` s, doubling each time (±25 % jitter), capped at
            ``max_backoff``; a 429's ``Retry-After`` header is honoured up to the same cap.
        concurrency: requests in flight at once.
        max_calls / max_tokens: budget of HTTP requests (retries included) and of tokens (the
            server's reported ``usage.total_tokens``) for this run; once spent, calls are refused
            (no answer, counted as ``budget_refused``). None = unlimited.
    """

    def __init__(
        self, base_url: str, owner: str, api_key_env: str | None = None, timeout: float = 60.0,
        retries: int = 3, backoff: float = 0.5, max_backoff: float = 8.0, concurrency: int = 4,
        max_calls: int | None = None, max_tokens: int | None = None,
    ) -> None:
        checks = {"timeout": timeout > 0, "retries": retries >= 0, "backoff": backoff >= 0,
                  "concurrency": concurrency >= 1, "max_calls": max_calls is None or max_calls >= 1,
                  "max_tokens": max_tokens is None or max_tokens >= 1}
        for name, ok in checks.items():
            if not ok:
                raise SettingError(f"{owner}.{name}={locals()[name]!r} is out of range: timeout > 0, "
                                 "retries >= 0, backoff >= 0, concurrency >= 1, budgets >= 1 or null")
        if not base_url.startswith(("http://", "https://")):
            raise SettingError(f"{owner}.base_url={base_url!r} must start with http:// or https:// "
                             "(e.g. http://127.0.0.1:8000/v1)")
        self.base_url, self.owner = base_url.rstrip("/"), owner
        self.api_key_env = api_key_env
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise SettingError(
                f"{owner}.api_key_env={api_key_env!r} names an environment variable that is not set; "
                f"export {api_key_env}=<your key> before the run, or set api_key_env: null for a server "
                "that needs no key"
            )
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.concurrency, self.max_calls, self.max_tokens = concurrency, max_calls, max_tokens
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.Lock()
        self._client = None
        self._budget_warned = False

    # ----- the client: built lazily, never pickled (it holds the key and open sockets) --------
    @property
    def client(self):  # noqa: ANN201 - openai.OpenAI
        if self._client is None:
            import openai  # openai.Timeout, not httpx's: newer SDKs ship httpx2 instead of httpx

            self._client = openai.OpenAI(
                base_url=self.base_url, api_key=self._key() or "EMPTY", max_retries=0,
                timeout=openai.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
            )
        return self._client

    def _key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_client=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def redact(self, text: str) -> str:
        """``text`` with the API key (if any) replaced by ``***``."""
        key = self._key()
        return text.replace(key, "***") if key else text

    # ----- setup check ------------------------------------------------------------------------
    def check(self, model: str) -> None:
        """Fail now, naming the URL, when the server is down, refuses the key, or lacks ``model``."""
        served = self._served()
        if served and model not in served:
            raise TeacherUnreachable(f"{self.owner}: the server at {self.base_url} does not serve model "
                               f"{model!r}; it serves {served}. Set model to one of these.")

    def _served(self) -> list[str]:
        """The model ids the server lists; one RuntimeError naming the URL when it cannot say."""
        import openai

        try:
            return [m.id for m in self.client.with_options(timeout=min(self.timeout, 10.0)).models.list()]
        except openai.APIStatusError as err:
            raise TeacherUnreachable(self.redact(
                f"{self.owner}: {self.base_url}/models answered HTTP {err.status_code}; " + _status_hint(
                    err.status_code, self.owner, self.api_key_env)
            )) from None
        except (openai.APIConnectionError, OSError) as err:
            raise TeacherUnreachable(self.redact(
                f"{self.owner}: cannot reach the teacher server at {self.base_url} "
                f"({type(err).__name__}). Start it first (e.g. `python -m lit_opd serve-teacher --model "
                "PATH --port 8000`, `vllm serve MODEL`) or fix base_url."
            )) from None
        except (openai.APIError, ValueError, TypeError, AttributeError) as err:  # e.g. a body not JSON
            raise TeacherUnreachable(self.redact(
                f"{self.owner}: {self.base_url}/models answered with something that is not an OpenAI "
                f"model list ({type(err).__name__}); is base_url an OpenAI-compatible root (often .../v1)?"
            )) from None

    # ----- calls ------------------------------------------------------------------------------
    def call(self, request: Callable[[Any], T], tokens: Callable[[T], int] | None = None) -> T | None:
        """``request(client)`` with retries; None when it still fails or the budget is spent.
        ``request`` raises :class:`MalformedAnswer` when the body is not what it asked for;
        ``tokens`` reads the tokens a successful answer used (for the budget)."""
        for attempt in range(self.retries + 1):
            if not self._take_call():
                return None
            try:
                answer = request(self.client)
            except Exception as err:  # noqa: BLE001 - classified below; unknown errors are bugs
                wait = self._classify(err)
                if wait is None or attempt == self.retries:
                    self._count("failed")
                    log.warning(self.redact(f"{self.owner}: no answer from {self.base_url} after "
                                            f"{attempt + 1} attempt(s): {_describe(err)}"))
                    return None
                self._count("retries")
                time.sleep(wait if wait > 0 else self._delay(attempt))
                continue
            if tokens is not None:
                self._count("tokens", tokens(answer))
            return answer
        return None

    def map(self, request: Callable[[Any, R], T], items: Iterable[R],
            tokens: Callable[[T], int] | None = None) -> list[T | None]:
        """``call`` for every item, ``concurrency`` at a time; answers in the items' order."""
        items = list(items)
        if len(items) <= 1 or self.concurrency == 1:
            return [self.call(lambda c, it=it: request(c, it), tokens) for it in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(lambda it: self.call(lambda c: request(c, it), tokens), items))

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {k: float(v) for k, v in self.counts.items()}

    def restore(self, stats: dict) -> None:
        """Counters from a checkpoint, so a resumed run keeps spending the same budget."""
        with self._lock:
            for key in COUNTERS:
                self.counts[key] = int(stats.get(key, self.counts[key]))

    # ----- internals --------------------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def _take_call(self) -> bool:
        with self._lock:
            spent = (self.max_calls is not None and self.counts["calls"] >= self.max_calls) or (
                self.max_tokens is not None and self.counts["tokens"] >= self.max_tokens)
            if spent:
                self.counts["budget_refused"] += 1
                warn, self._budget_warned = not self._budget_warned, True
            else:
                self.counts["calls"] += 1
        if spent and warn:
            log.warning(f"{self.owner}: the run's budget (max_calls={self.max_calls}, max_tokens="
                        f"{self.max_tokens}) is spent; further requests get no answer")
        return not spent

    def _classify(self, err: Exception) -> float | None:
        """Seconds to wait before a retry (0 = the usual backoff), or None: do not retry."""
        import openai

        if isinstance(err, openai.APITimeoutError):
            self._count("timeouts")
        elif isinstance(err, openai.APIConnectionError):
            self._count("connection_errors")
        elif isinstance(err, openai.RateLimitError):
            self._count("http_429")
            return min(_retry_after(err), self.max_backoff)
        elif isinstance(err, openai.APIStatusError):
            if err.status_code >= 500:
                self._count("http_5xx")
                return 0.0
            self._count("http_4xx")
            return None
        elif isinstance(err, (MalformedAnswer, openai.APIResponseValidationError, json.JSONDecodeError)):
            # Only bodies the request callable or the SDK rejected: a bug in our own parsing must raise,
            # not turn every answer into "no answer" while the run goes on.
            self._count("malformed")
        else:
            raise err
        return 0.0

    def _delay(self, attempt: int) -> float:
        return min(self.backoff * 2**attempt, self.max_backoff) * random.uniform(0.75, 1.25)


def _status_hint(status: int, owner: str, api_key_env: str | None) -> str:
    """What to fix for an HTTP error at setup."""
    if status in (401, 403) and api_key_env is None:
        return (f"the server needs a key: put it in an environment variable and set {owner}.api_key_env "
                "to that variable's name")
    if status in (401, 403):
        return f"the server refused the key in ${api_key_env}; check its value"
    return "check base_url (it should end in /v1 for an OpenAI-compatible server)"


def _retry_after(err: Exception) -> float:
    try:
        return max(float(err.response.headers.get("retry-after", 0.0)), 0.0)
    except (AttributeError, TypeError, ValueError):
        return 0.0


def _describe(err: Exception) -> str:
    status = getattr(err, "status_code", None)
    return f"{type(err).__name__}" + (f" (HTTP {status})" if status else "") + f": {str(err)[:200]}"
