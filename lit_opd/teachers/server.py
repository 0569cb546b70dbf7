"""A teacher behind a log-prob server: vLLM's OpenAI-compatible ``/v1/completions`` with
``prompt_logprobs``, as served by ``vllm serve MODEL --max-logprobs K`` or by
``python -m lit_opd serve-teacher --model PATH --k K``.

Each row goes to the server as token ids (its unpadded prompt, then its completion up to the last
generated token), asking for one greedy token and the top-``k`` log-probs of every prompt
position. The answer at prompt position ``P_i + t`` is the distribution that predicted completion
token ``t``: its ``k`` best entries become the top-k, and the entry of the actual token (the
server always adds it) becomes the token log-prob. The server must therefore use the student's
token ids; ``tokenizer`` lets the method check that the vocabularies agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import PreTrainedTokenizerBase

from lit_opd.errors import SettingError, TeacherUnreachable
from lit_opd.teachers.api import check_key_env_name
from lit_opd.teachers.base import Teacher
from lit_opd.teachers.remote import MalformedAnswer, RemoteCalls
from lit_opd.types import RolloutBatch, TeacherCapability, TeacherOutput

PROBE_IDS = [0, 0]  # two tokens: position 1 carries a distribution, which is all the probe needs


@dataclass
class _Scored:
    """One request's rows, read off the server's answer: per row, per completion token."""

    topk_ids: list[list[list[int]]]
    topk_logp: list[list[list[float]]]
    token_logp: list[list[float]]
    tokens: int


class ServerTeacher(Teacher):
    """Top-k log-probs from a vLLM-compatible server (TOPK_LOGPROBS capability).

    Args:
        base_url: the server's OpenAI-compatible root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model name (vLLM: the model path or ``--served-model-name``).
        k: log-probs per position; the server must allow it (vLLM ``--max-logprobs``, serve-teacher
            ``--k``). Use the objective's ``top_k``.
        tokenizer: the teacher's tokenizer (path or object), only so the method can check that the
            server's token ids are the student's; None skips the check.
        rows_per_request: rows sent in one HTTP request (64: one request per quickstart batch; on
            loopback a request costs a few ms of HTTP and JSON, so fewer, larger requests are faster
            unless several server replicas share the load).
        concurrency, timeout, retries, backoff, api_key_env, max_calls, max_total_tokens: the client's
            robustness settings (see :class:`~lit_opd.teachers.remote.RemoteCalls`). The API key is
            read from the environment variable *named* by ``api_key_env``; it never enters a
            config, log or checkpoint.

    A request that still fails after its retries leaves its rows unanswered (``answered_B``
    False): the method drops them from that step's loss and the run goes on.
    """

    capability: ClassVar[TeacherCapability] = TeacherCapability.TOPK_LOGPROBS

    def __init__(
        self, base_url: str, model: str, k: int = 20, tokenizer: str | PreTrainedTokenizerBase | None = None,
        rows_per_request: int = 64, concurrency: int = 4, timeout: float = 60.0, retries: int = 3,
        backoff: float = 0.5, api_key_env: str | None = None, max_calls: int | None = None,
        max_total_tokens: int | None = None,
    ) -> None:
        for name, value in (("k", k), ("rows_per_request", rows_per_request)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingError(f"ServerTeacher.{name}={value!r} must be an integer >= 1 (k: log-probs per "
                                 "position, the objective's top_k; rows_per_request: rows per HTTP request)")
        if not isinstance(model, str) or not model:
            raise SettingError(f"ServerTeacher.model={model!r} must name the served model "
                             "(as the server's /v1/models lists it)")
        check_key_env_name("ServerTeacher", api_key_env)  # a pasted key is refused without echoing it
        self.remote = RemoteCalls(
            base_url, "ServerTeacher", api_key_env=api_key_env, timeout=timeout, retries=retries,
            backoff=backoff, concurrency=concurrency, max_calls=max_calls, max_tokens=max_total_tokens,
        )
        self.base_url, self.model = self.remote.base_url, model
        self.k, self.rows_per_request = k, rows_per_request
        if tokenizer is not None:
            from lit_opd.models import load_tokenizer

            self.tokenizer = load_tokenizer(tokenizer, tokenizer if isinstance(tokenizer, str) else None)

    # ----- protocol -----------------------------------------------------------------------------
    def identity(self) -> dict:
        return {"class": type(self).__name__, "base_url": self.base_url, "model": self.model, "k": self.k}

    def stats(self) -> dict[str, float]:
        return self.remote.stats()

    def restore_stats(self, stats: dict[str, float]) -> None:
        self.remote.restore(stats)

    def connect(self) -> None:
        """The server is up, serves ``model`` and accepts ``prompt_logprobs=k``; else one clear error."""
        import openai

        self.remote.check(self.model)
        where = f"ServerTeacher: the server at {self.base_url}"
        try:
            self._request(self.remote.client, [(PROBE_IDS, 1)])
        except openai.APIStatusError as err:
            said = err.body.get("message", err.body) if isinstance(err.body, dict) else err.message
            raise TeacherUnreachable(self.remote.redact(
                f"{where} refused prompt_logprobs={self.k} (HTTP {err.status_code}: {said}). Start vLLM with "
                f"--max-logprobs {self.k} (or serve-teacher with --k {self.k}), or lower ServerTeacher.k."
            )) from None
        except (openai.APIError, OSError) as err:
            raise TeacherUnreachable(self.remote.redact(
                f"{where} did not answer a scoring request ({type(err).__name__}: {err}); check that it "
                "is up and serves /completions"
            )) from None
        except (MalformedAnswer, ValueError, KeyError, TypeError) as err:
            raise TeacherUnreachable(self.remote.redact(
                f"{where} answered a scoring request without usable prompt_logprobs ({err}). ServerTeacher "
                "needs vLLM's protocol: `vllm serve MODEL --max-logprobs K` or `python -m lit_opd "
                "serve-teacher --model PATH --k K`."
            )) from None

    @torch.no_grad()
    def score(self, batch: RolloutBatch) -> TeacherOutput:
        rows = _rows(batch)
        B, T, k = batch.completion_ids_BT.shape[0], batch.completion_ids_BT.shape[1], self.k
        starts = range(0, B, self.rows_per_request)
        answers = self.remote.map(
            lambda client, start: self._request(client, rows[start : start + self.rows_per_request]),
            starts, tokens=lambda scored: scored.tokens,
        )
        filler_ids, filler_logp = list(range(k)), [-math.log(k)] * k
        topk_ids = [[filler_ids] * T for _ in range(B)]
        topk_logp = [[filler_logp] * T for _ in range(B)]
        token_logp = [[0.0] * T for _ in range(B)]
        answered = [False] * B
        for start, scored in zip(starts, answers):
            if scored is None:  # failed after its retries: these rows keep their filler
                continue
            for offset, n in enumerate(len(lp) for lp in scored.token_logp):
                i = start + offset
                topk_ids[i][:n], topk_logp[i][:n] = scored.topk_ids[offset], scored.topk_logp[offset]
                token_logp[i][:n], answered[i] = scored.token_logp[offset], True
        device = batch.completion_ids_BT.device
        return TeacherOutput(
            topk_logp_BTK=torch.tensor(topk_logp, dtype=torch.float32).reshape(B, T, k).to(device),
            topk_ids_BTK=torch.tensor(topk_ids, dtype=torch.long).reshape(B, T, k).to(device),
            token_logp_BT=torch.tensor(token_logp, dtype=torch.float32).reshape(B, T).to(device),
            answered_B=torch.tensor(answered, dtype=torch.bool, device=device),
        )

    # ----- one request --------------------------------------------------------------------------
    def _request(self, client: Any, rows: list[tuple[list[int], int]]) -> _Scored:
        """POST ``rows`` (token ids, prompt length) and read their completions' log-probs; raises
        :class:`MalformedAnswer` (retried) when the answer lacks what was asked for."""
        import jiter  # the openai SDK's JSON parser: ~2x faster than json on the large prompt_logprobs

        raw = client.completions.with_raw_response.create(
            model=self.model, prompt=[ids for ids, _ in rows], max_tokens=1, temperature=0,
            extra_body={"prompt_logprobs": self.k},
        )
        try:
            body = jiter.from_json(raw.content)
        except ValueError as err:
            raise MalformedAnswer(f"the answer is not JSON: {err}") from None
        return _parse(body, rows, self.k)


def _rows(batch: RolloutBatch) -> list[tuple[list[int], int]]:
    """Per row: its unpadded prompt followed by its completion up to the last generated token, and
    the prompt's length."""
    T = batch.completion_ids_BT.shape[1]
    mask_BT = batch.completion_mask_BT.detach().cpu().bool()
    lengths = (mask_BT * torch.arange(1, T + 1)).amax(-1).tolist() if T else [0] * mask_BT.shape[0]
    prompts = batch.prompt_ids_BP.detach().cpu().tolist()
    keep = batch.prompt_mask_BP.detach().cpu().bool().tolist()
    completions = batch.completion_ids_BT.detach().cpu().tolist()
    rows = []
    for i, (ids, kept, completion, n) in enumerate(zip(prompts, keep, completions, lengths)):
        prompt = [t for t, on in zip(ids, kept) if on]
        if not prompt:
            raise SettingError(f"ServerTeacher: row {i} has an empty prompt; the server cannot score a "
                             "completion without a token before it (give every prompt a token, e.g. BOS)")
        rows.append((prompt + completion[:n], len(prompt)))
    return rows


def _parse(body: dict, rows: list[tuple[list[int], int]], k: int) -> _Scored:
    """vLLM's ``prompt_logprobs`` for ``rows``: entry j of a choice maps str(token id) to
    ``{"logprob", "rank", ...}`` for the top-k tokens predicting token j plus token j itself."""
    try:
        choices = sorted(body["choices"], key=lambda c: c["index"])
        tokens = int((body.get("usage") or {}).get("total_tokens", 0))
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedAnswer(f"the answer has no usable choices ({type(err).__name__}: {err})") from None
    if len(choices) != len(rows):
        raise MalformedAnswer(f"asked for {len(rows)} prompts, the answer has {len(choices)} choices")
    scored = _Scored([], [], [], tokens)
    for choice, (ids, prompt_len) in zip(choices, rows):
        positions = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
        if not isinstance(positions, list) or len(positions) != len(ids):
            raise MalformedAnswer(f"a choice lacks prompt_logprobs for its {len(ids)} prompt tokens")
        read = [_position(positions[j], ids[j], k) for j in range(prompt_len, len(ids))]
        scored.topk_ids.append([best_ids for best_ids, _, _ in read])
        scored.topk_logp.append([best_logp for _, best_logp, _ in read])
        scored.token_logp.append([actual for _, _, actual in read])
    return scored


def _position(entry: Any, token: int, k: int) -> tuple[list[int], list[float], float]:
    """The ``k`` best (ids, log-probs), descending, and the actual token's log-prob at one position."""
    if not isinstance(entry, dict) or len(entry) < k or str(token) not in entry:
        got = len(entry) if isinstance(entry, dict) else type(entry).__name__
        raise MalformedAnswer(f"a position holds {got} log-probs, expected the top {k} plus token {token}")
    try:
        ranked = sorted(((float(v["logprob"]), int(t)) for t, v in entry.items()), reverse=True)[:k]
        actual = float(entry[str(token)]["logprob"])
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedAnswer(f"a log-prob entry is not {{'logprob': float, ...}}: {err}") from None
    return [t for _, t in ranked], [v for v, _ in ranked], actual
