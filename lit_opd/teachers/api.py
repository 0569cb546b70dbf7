"""A text-only teacher behind any OpenAI-compatible API: it is asked for text continuations of
prefixes and nothing else, so any served or hosted model can teach, whatever its tokenizer.

``completions`` mode continues the raw prefix (``/v1/completions``); ``chat`` mode wraps it in a user
message that asks for the continuation only (``/v1/chat/completions``), for servers and hosted APIs
that only speak chat. A :class:`~lit_opd.rollout.prompts.ChatPrefix` keeps the conversation's roles in
chat mode: the messages as they are, the response so far as the assistant's turn, then a request to go
on (:func:`continue_messages`). Every request goes through :class:`~lit_opd.teachers.remote.RemoteCalls`
(retries, concurrency, budget, counters, key redaction); a request that still fails gives ``None``
for its samples, never an exception.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from lit_opd.errors import SettingError
from lit_opd.rollout.prompts import ChatPrefix
from lit_opd.teachers.base import Teacher
from lit_opd.teachers.remote import MalformedAnswer, RemoteCalls
from lit_opd.types import RolloutBatch, TeacherCapability, TeacherOutput

log = logging.getLogger(__name__)

CONTINUE_INSTRUCTION = (
    "Continue the text below from exactly where it stops. Reply with the continuation only: do not "
    "repeat the text, do not add quotes, explanations or anything else."
)
# After a conversation whose last assistant turn (the student's response so far) stops mid-way.
RESUME_INSTRUCTION = (
    "Your reply above stops mid-way. Continue it from exactly where it stops. Reply with the continuation "
    "only: do not repeat what you wrote, do not add quotes, explanations or anything else."
)
MODES = ("completions", "chat")
OWN_COUNTERS = ("n_ignored", "topup_requests", "unanswered_samples")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Prefixes of common API keys and tokens (OpenAI/Anthropic sk-, Hugging Face hf_, GitHub ghp_, Groq
# gsk_, Google AIza) followed by a long run of key characters.
KEY_LIKE = re.compile(r"(sk|hf|ghp|gho|gsk|AIza|xox[abp])[-_]?[A-Za-z0-9_-]{16,}")
MAX_ENV_NAME = 40


# ----- shared with HFTextTeacher ------------------------------------------------------------------
def continue_messages(prefix: str, instruction: str, system_prompt: str | None) -> list[dict]:
    """The chat messages that ask a model to continue ``prefix``. A plain string: the instruction, a
    blank line, then the prefix last, so that it is what the model's answer follows. A
    :class:`ChatPrefix`: its conversation with the roles kept (``system_prompt`` first unless it has its
    own), then, once there is a response so far, that response as the assistant's turn and
    :data:`RESUME_INSTRUCTION`; with none, the model simply answers the conversation."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if not isinstance(prefix, ChatPrefix):
        return [*system, {"role": "user", "content": f"{instruction}\n\n{prefix}"}]
    conversation = [{"role": m["role"], "content": m["content"]} for m in prefix.messages]
    if conversation and conversation[0]["role"] == "system":
        system = []
    if not prefix.response:
        return [*system, *conversation]
    return [*system, *conversation, {"role": "assistant", "content": prefix.response},
            {"role": "user", "content": RESUME_INSTRUCTION}]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string; servers that ignore ``stop`` and
    local generation that overshoots end up with the same text."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


def check_stop(owner: str, stop: str | Sequence[str] | None) -> list[str]:
    """``stop`` as a list of non-empty strings (a single string is one stop string)."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stop):
        raise SettingError(f"{owner}.stop={stop!r} must be a list of non-empty strings (or null)")
    return stop


def check_text_request(owner: str, max_new_tokens: int, num_samples: int, temperature: float) -> None:
    """The arguments of ``generate_text`` (a method's bug, reported as such)."""
    if not (isinstance(max_new_tokens, numbers.Integral) and max_new_tokens >= 1):
        raise SettingError(f"{owner}.generate_text: max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not (isinstance(num_samples, numbers.Integral) and num_samples >= 1):
        raise SettingError(f"{owner}.generate_text: num_samples={num_samples!r} must be an integer >= 1")
    if not _finite_nonneg(temperature):
        raise SettingError(f"{owner}.generate_text: temperature={temperature!r} must be a finite number >= 0")


def no_logprobs(owner: str) -> NotImplementedError:
    """The error ``score`` raises on a text-only teacher."""
    return NotImplementedError(
        f"{owner} is a text-only teacher: it returns text continuations (generate_text), not log-probs, "
        "so it cannot score token by token. Use it with a text-only method, or use ServerTeacher (log-probs "
        "from a served model) or HFTeacher (a local model's logits) for token-level methods."
    )


def check_key_env_name(owner: str, api_key_env: str | None) -> None:
    """Refuse an ``api_key_env`` that is not an environment-variable *name* — most likely the key itself
    pasted in — without repeating it: the message, the log and the traceback never show the value."""
    if api_key_env is None:
        return
    name_like = isinstance(api_key_env, str) and ENV_NAME.fullmatch(api_key_env) is not None
    if name_like and len(api_key_env) <= MAX_ENV_NAME and not KEY_LIKE.fullmatch(api_key_env):
        return
    raise SettingError(
        f"{owner}.api_key_env must be the NAME of an environment variable that holds the key (e.g. "
        "OPENAI_API_KEY), but the value given looks like a key itself (not shown here); put the key in a "
        f"variable (export MY_API_KEY=...) and set {owner}.api_key_env: MY_API_KEY"
    )


def _finite_nonneg(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


@dataclass(frozen=True)
class _Request:
    """``n`` samples of prompt ``row``, the first of which is sample ``first`` (its seed offset)."""

    row: int
    first: int
    n: int


class APITeacher(Teacher):
    """Text continuations from a model behind an OpenAI-compatible API (``transformers serve``,
    vLLM, SGLang, a hosted API).

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` or ``https://api.example.com/v1``.
        model: the model name the server expects.
        api_key_env: *name* of the environment variable holding the API key (None: no key). The key
            never enters a config, log, message, checkpoint or this object's state.
        mode: "completions" continues the raw prefix (a ``ChatPrefix``: the rendered prompt and the
            response so far); "chat" asks for the continuation in a chat message (``continue_instruction``
            + the prefix; a ``ChatPrefix`` is sent as its conversation, roles kept), for chat-only endpoints.
        max_tokens: cap on the caller's ``max_new_tokens`` (tokens of the *teacher's* tokenizer).
        stop: strings that end a continuation (sent to the server and also cut here).
        temperature: sampling temperature for every request; None = the caller's.
        continue_instruction / system_prompt: the chat-mode user instruction and optional system message.
        n_per_request: ask for all samples of a prompt in one request (``n``). Servers that return
            fewer choices (they ignore ``n``) are topped up with single requests, and from then on
            get one request per sample (``teacher/n_ignored`` = 1). False: always one per sample
            (for APIs that reject ``n`` > 1).
        timeout / retries / backoff / concurrency: see :class:`RemoteCalls`.
        max_calls / max_total_tokens: the run's budget of requests and of tokens (the server's
            ``usage.total_tokens``); once spent, samples are unanswered (``None``). None = unlimited.
        seed_requests: send ``seed`` (the caller's seed + sample index) so that servers that honour
            it answer reproducibly.
    """

    capability: ClassVar[TeacherCapability] = TeacherCapability.TEXT_ONLY

    def __init__(
        self, base_url: str, model: str, api_key_env: str | None = None,
        mode: Literal["completions", "chat"] = "completions", max_tokens: int | None = None,
        stop: list[str] | None = None, temperature: float | None = None,
        continue_instruction: str = CONTINUE_INSTRUCTION, system_prompt: str | None = None,
        n_per_request: bool = True, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
        concurrency: int = 4, max_calls: int | None = None, max_total_tokens: int | None = None,
        seed_requests: bool = True,
    ) -> None:
        check_key_env_name("APITeacher", api_key_env)
        _check_settings(model=model, mode=mode, max_tokens=max_tokens, temperature=temperature,
                        continue_instruction=continue_instruction, system_prompt=system_prompt,
                        max_calls=max_calls, max_total_tokens=max_total_tokens)
        self.model, self.mode, self.max_tokens, self.temperature = model, mode, max_tokens, temperature
        self.stop = check_stop("APITeacher", stop)
        self.continue_instruction, self.system_prompt = continue_instruction, system_prompt
        self.n_per_request, self.seed_requests = bool(n_per_request), bool(seed_requests)
        self.calls = RemoteCalls(base_url, "APITeacher", api_key_env=api_key_env, timeout=timeout,
                                 retries=retries, backoff=backoff, concurrency=concurrency,
                                 max_calls=max_calls, max_tokens=max_total_tokens)
        self.counts = dict.fromkeys(OWN_COUNTERS, 0)

    def __repr__(self) -> str:
        return (f"APITeacher(base_url={self.calls.base_url!r}, model={self.model!r}, mode={self.mode!r}, "
                f"api_key_env={self.calls.api_key_env!r})")

    # ----- protocol -----------------------------------------------------------------------------
    def score(self, batch: RolloutBatch) -> TeacherOutput:  # noqa: ARG002 - nothing to score with
        raise no_logprobs("APITeacher")

    def identity(self) -> dict:
        return {"class": type(self).__name__, "base_url": self.calls.base_url, "model": self.model,
                "mode": self.mode}

    def connect(self) -> None:
        self.calls.check(self.model)

    def stats(self) -> dict[str, float]:
        return {**self.calls.stats(), **{k: float(v) for k, v in self.counts.items()}}

    def restore_stats(self, stats: dict[str, float]) -> None:
        self.calls.restore(stats)
        for key in OWN_COUNTERS:
            self.counts[key] = int(stats.get(key, self.counts[key]))

    def generate_text(
        self, prompts: Sequence[str], max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
        seed: int = 0,
    ) -> list[list[str | None]]:
        """``num_samples`` continuations of each prompt; ``None`` for samples whose request failed
        after its retries or was refused by the budget."""
        check_text_request("APITeacher", max_new_tokens, num_samples, temperature)
        settings = {"max_tokens": min(max_new_tokens, self.max_tokens or max_new_tokens),
                    "temperature": float(self.temperature if self.temperature is not None else temperature),
                    "seed": int(seed)}
        out: list[list[str | None]] = [[None] * num_samples for _ in prompts]
        if out and self.n_per_request and not self.counts["n_ignored"] and num_samples > 1:
            self._fill_together(out, prompts, settings)
        else:
            self._fill(out, prompts, [_Request(i, k, 1) for i in range(len(prompts))
                                      for k in range(num_samples)], settings)
        self.counts["unanswered_samples"] += sum(t is None for row in out for t in row)
        return out

    # ----- requests -----------------------------------------------------------------------------
    def _fill_together(self, out: list[list[str | None]], prompts: Sequence[str], settings: dict) -> None:
        """One request for all samples of each prompt; a prompt that got fewer choices (the server
        ignores ``n``) is topped up one sample at a time, and later calls skip the n request."""
        num_samples = len(out[0])
        got = self._fill(out, prompts, [_Request(i, 0, num_samples) for i in range(len(prompts))], settings)
        short = [_Request(i, k, 1) for i, n in enumerate(got) if 0 < n < num_samples
                 for k in range(n, num_samples)]
        if short:
            self._switch_to_single()
            self.counts["topup_requests"] += len(short)
            self._fill(out, prompts, short, settings)

    def _fill(self, out: list[list[str | None]], prompts: Sequence[str], requests: list[_Request],
              settings: dict) -> list[int]:
        """Send ``requests`` (``concurrency`` at a time), write their texts into ``out`` and return
        how many choices each request got (0: no answer)."""
        answers = self.calls.map(lambda client, req: self._ask(client, prompts[req.row], req, settings),
                                 requests, tokens=lambda answer: answer[1])
        got = []
        for req, answer in zip(requests, answers):
            texts = answer[0][: req.n] if answer is not None else []
            out[req.row][req.first : req.first + len(texts)] = texts
            got.append(len(texts))
        return got

    def _ask(self, client: Any, prefix: str, req: _Request, settings: dict) -> tuple[list[str | None], int]:
        """One request: the texts of its choices (None where a chat answer had no text) and the
        tokens the server says it used. Raises :class:`MalformedAnswer` (retried) on an empty body."""
        kwargs: dict[str, Any] = {"model": self.model, "max_tokens": settings["max_tokens"],
                                  "temperature": settings["temperature"]}
        if req.n > 1:  # n=1 is left out: some APIs reject the field outright
            kwargs["n"] = req.n
        if self.stop:
            kwargs["stop"] = self.stop
        if self.seed_requests:
            kwargs["seed"] = settings["seed"] + req.first
        if self.mode == "completions":
            answer = client.completions.create(prompt=str(prefix), **kwargs)
            texts = [getattr(choice, "text", None) for choice in _choices(answer)]
        else:
            messages = continue_messages(prefix, self.continue_instruction, self.system_prompt)
            answer = client.chat.completions.create(messages=messages, **kwargs)
            texts = [getattr(getattr(c, "message", None), "content", None) for c in _choices(answer)]
        if not texts or not all(t is None or isinstance(t, str) for t in texts):
            raise MalformedAnswer(f"expected text choices, got {str(answer)[:200]}")
        tokens = getattr(getattr(answer, "usage", None), "total_tokens", None) or 0
        return [cut_at_stop(t, self.stop) if t is not None else None for t in texts], int(tokens)

    def _switch_to_single(self) -> None:
        self.counts["n_ignored"] = 1
        log.info(f"APITeacher: {self.calls.base_url} returned fewer choices than the n asked for; topping "
                 "up and sending one request per sample from now on (set n_per_request: false to skip "
                 "the first try)")


def _check_settings(**settings: Any) -> None:
    """One clear error per bad setting (the rest are checked by RemoteCalls)."""
    def bad(name: str, rule: str) -> ValueError:
        return ValueError(f"APITeacher.{name}={settings[name]!r} {rule}")

    if not (isinstance(settings["model"], str) and settings["model"].strip()):
        raise bad("model", "must be the model name the server serves (see its /v1/models)")
    if settings["mode"] not in MODES:
        raise bad("mode", "must be 'completions' (continue a raw prefix) or 'chat' (chat-only endpoints)")
    for name in ("max_tokens", "max_calls", "max_total_tokens"):
        value = settings[name]
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise bad(name, "must be an integer >= 1, or null for no limit")
    if settings["temperature"] is not None and not _finite_nonneg(settings["temperature"]):
        raise bad("temperature", "must be a finite number >= 0, or null to use the method's temperature")
    if not (isinstance(settings["continue_instruction"], str) and settings["continue_instruction"].strip()):
        raise bad("continue_instruction", "must be a non-empty instruction (the default asks for the "
                  "continuation only)")
    if settings["system_prompt"] is not None and not isinstance(settings["system_prompt"], str):
        raise bad("system_prompt", "must be a string, or null for no system message")


def _choices(answer: Any) -> list:
    """The answer's choices; a body the SDK could not read as a completion (e.g. a non-JSON text
    body, which it returns as a string) is malformed and retried."""
    choices = getattr(answer, "choices", None)
    if not isinstance(choices, list):
        raise MalformedAnswer(f"expected a completion with choices, got {str(answer)[:200]}")
    return choices
