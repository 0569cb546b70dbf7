"""``python -m lit_opd serve-teacher --model PATH``: a local causal LM behind the slice of vLLM's
OpenAI-compatible API that :class:`~lit_opd.teachers.server.ServerTeacher` speaks.

``POST /v1/completions`` scores prompts: with ``prompt_logprobs: K`` (at most ``--k``) every
prompt position after the first gets the top-K log-probs of the distribution that predicted its
token, plus that token's own entry, in vLLM's shape; ``choices[i].text`` is the greedy next token
(``max_tokens`` must be 1: this server scores, it does not generate). The model is loaded exactly
as :class:`~lit_opd.teachers.hf.HFTeacher` loads it, so a run against this server trains as one
with the in-process teacher. ``GET /health`` and ``GET /v1/models`` complete the set.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at runtime,
# and ``Request`` is imported inside build_app (fastapi is an optional dependency).
import argparse
import hmac
import json
import os
import sys
import threading
import time
import uuid

import torch

from lit_opd.errors import UserError
from lit_opd.models import DTYPES, ModelSpec, freeze, load_causal_lm, load_tokenizer


class BadRequest(Exception):
    """A request this server refuses, with its HTTP status and OpenAI error type."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.status, self.kind = message, status, kind


class _Texts(dict):
    """Token id -> its decoded text, decoded on first use (a large vocabulary is never decoded whole)."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        super().__init__()
        self.tokenizer = tokenizer

    def __missing__(self, token: int) -> str:
        try:
            text = self.tokenizer.decode([token])
        except (IndexError, KeyError, TypeError, ValueError, OverflowError):
            text = ""  # an id past the tokenizer (padded embedding rows) has no text
        self[token] = text
        return text


class Scorer:
    """The model, its tokenizer and a lock: batched scoring forwards, one request at a time."""

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device, max_k: int,  # noqa: ANN001
                 max_batch_tokens: int) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_k, self.max_batch_tokens = max_k, max_batch_tokens
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.texts = _Texts(tokenizer)
        self.lock = threading.Lock()  # requests are scored in a thread pool; one forward at a time

    def choices(self, prompts: list[list[int]], top_n: int | None) -> list[dict]:
        """One vLLM-shaped choice per prompt, in order; prompts are scored in chunks of at most
        ``max_batch_tokens`` padded tokens (longest first, so a chunk wastes little padding)."""
        for i, ids in enumerate(prompts):
            if not ids:
                raise BadRequest(f"prompt {i} is empty; send at least one token")
            if min(ids) < 0 or max(ids) >= self.vocab:
                raise BadRequest(f"prompt {i} holds a token id outside [0, {self.vocab}) of this model")
            if self.context is not None and len(ids) > self.context:
                raise BadRequest(f"prompt {i} has {len(ids)} tokens; this model's context is {self.context}")
        out: list[dict | None] = [None] * len(prompts)
        for chunk in self._chunks(prompts):
            for i, choice in zip(chunk, self._score_chunk([prompts[i] for i in chunk], top_n)):
                out[i] = {"index": i, **choice}
        return out

    def _chunks(self, prompts: list[list[int]]) -> list[list[int]]:
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        chunks: list[list[int]] = []
        for i in order:
            if chunks and (len(chunks[-1]) + 1) * len(prompts[chunks[-1][0]]) <= self.max_batch_tokens:
                chunks[-1].append(i)
            else:
                chunks.append([i])
        return chunks

    @torch.no_grad()
    def _score_chunk(self, prompts: list[list[int]], top_n: int | None) -> list[dict]:
        N, L = len(prompts), max(map(len, prompts))
        ids_NL = torch.zeros(N, L, dtype=torch.long)
        mask_NL = torch.zeros(N, L, dtype=torch.long)
        for r, ids in enumerate(prompts):  # right padding: positions 0..len-1 need no position ids shift
            ids_NL[r, : len(ids)], mask_NL[r, : len(ids)] = torch.tensor(ids), 1
        lengths_N, rows_N = mask_NL.sum(-1).to(self.device), torch.arange(N, device=self.device)
        with self.lock:
            logits_NLV = self.model(
                input_ids=ids_NL.to(self.device), attention_mask=mask_NL.to(self.device),
                position_ids=torch.arange(L, device=self.device).expand(N, L), use_cache=False,
            ).logits
            logp_NLV = logits_NLV.float().log_softmax(-1)
            greedy_N = logp_NLV[rows_N, lengths_N - 1].argmax(-1)
            # Position m predicts token m+1: the distributions behind prompt entries 1..L-1.
            pred_NMV = logp_NLV[:, :-1]
            actual_NM = ids_NL[:, 1:].to(self.device)
            actual_logp_NM = pred_NMV.gather(-1, actual_NM.unsqueeze(-1)).squeeze(-1)
            rank_NM = (pred_NMV >= actual_logp_NM.unsqueeze(-1)).sum(-1)  # 1-based, like vLLM
            top_logp_NMK, top_ids_NMK = pred_NMV.topk(top_n or 0, dim=-1)
            # JSON has no -inf: a masked-out token gets the lowest finite float instead.
            lowest = torch.finfo(torch.float32).min
            actual_logp_NM, top_logp_NMK = actual_logp_NM.clamp(min=lowest), top_logp_NMK.clamp(min=lowest)
            # One host copy per chunk: per-element tensor access would dominate the request time.
            lists = [t.tolist() for t in (greedy_N, actual_logp_NM, rank_NM, top_logp_NMK, top_ids_NMK)]
        return [self._choice(ids, r, top_n, *lists) for r, ids in enumerate(prompts)]

    def _choice(self, ids: list[int], r: int, top_n: int | None, greedy: list, actual_logp: list, rank: list,
                top_logp: list, top_ids: list) -> dict:
        texts = self.texts
        choice = {"text": texts[greedy[r]], "logprobs": None, "finish_reason": "length", "stop_reason": None}
        if top_n is None:
            return {**choice, "prompt_logprobs": None}
        positions: list[dict | None] = [None]
        for m in range(len(ids) - 1):
            entry = {str(t): {"logprob": v, "rank": j + 1, "decoded_token": texts[t]}
                     for j, (t, v) in enumerate(zip(top_ids[r][m], top_logp[r][m]))}
            token = ids[m + 1]
            if str(token) not in entry:
                entry[str(token)] = {"logprob": actual_logp[r][m], "rank": rank[r][m],
                                     "decoded_token": texts[token]}
            positions.append(entry)
        return {**choice, "prompt_logprobs": positions}


# ----- the HTTP app ---------------------------------------------------------------------------------
def _prompts(prompt: object, tokenizer) -> list[list[int]]:  # noqa: ANN001
    """vLLM's prompt forms: list[int] | list[list[int]] | str | list[str]."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest("prompt must be a non-empty list of token ids, a list of such lists, a string or "
                         "a list of strings")
    if _token_ids(prompt):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        return [tokenizer(p)["input_ids"] for p in prompt]
    if all(isinstance(p, list) and _token_ids(p) for p in prompt):
        return prompt
    raise BadRequest("prompt must be a list of token ids, a list of such lists, a string or a list of "
                     "strings")


def _token_ids(values: list) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in values)


def _check_request(body: dict, name: str, max_k: int) -> int | None:
    """The request's ``prompt_logprobs`` after checking what this server supports."""
    if body.get("model") != name:
        raise BadRequest(f"The model `{body.get('model')}` does not exist; this server serves `{name}`.",
                         404, "not_found_error")
    max_tokens = body.get("max_tokens", 1)
    if max_tokens != 1:
        raise BadRequest(f"max_tokens={max_tokens!r}: serve-teacher scores prompts (prompt_logprobs) and "
                         "returns one greedy token; send max_tokens: 1")
    for key, ok in (("n", body.get("n", 1) == 1), ("stream", not body.get("stream")),
                    ("echo", not body.get("echo")), ("logprobs", body.get("logprobs") is None)):
        if not ok:
            raise BadRequest(f"{key}={body.get(key)!r} is not supported by serve-teacher (it scores "
                             "prompts); leave it out and ask for prompt_logprobs")
    top_n = body.get("prompt_logprobs")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
        raise BadRequest(f"prompt_logprobs={top_n!r} must be an integer >= 0")
    if top_n is not None and top_n > max_k:
        raise BadRequest(f"Requested prompt_logprobs={top_n}, more than this server's --k {max_k}; restart "
                         f"serve-teacher with --k {top_n} or ask for fewer")
    return top_n


def _error(message: str, status: int, kind: str):  # noqa: ANN202 - a starlette Response
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


def _json(payload: dict):  # noqa: ANN202 - a starlette Response
    """``payload`` serialized by pydantic's Rust encoder (a FastAPI dependency): several times faster
    than the standard library on the nested prompt_logprobs, and floats still round-trip exactly."""
    import pydantic_core
    from fastapi.responses import Response

    return Response(content=pydantic_core.to_json(payload), media_type="application/json")


def build_app(scorer: Scorer, name: str, api_key: str | None = None):  # noqa: ANN201 - a FastAPI app
    """The app: ``/health``, ``/v1/models``, ``/v1/completions``; with ``api_key`` every ``/v1``
    route needs ``Authorization: Bearer <api_key>`` (as vLLM's ``--api-key``)."""
    from fastapi import FastAPI, Request
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="lit_opd serve-teacher", docs_url=None, redoc_url=None, openapi_url=None)
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def require_key(request: Request, call_next):  # noqa: ANN001, ANN202
        given = request.headers.get("authorization", "").encode()
        if request.url.path.startswith("/v1") and not hmac.compare_digest(given, expected):
            return _error("Unauthorized: send the server's API key as `Authorization: Bearer <key>`", 401,
                          "authentication_error")
        return await call_next(request)

    if expected is not None:  # an HTTP middleware costs every request a few ms: only when a key is set
        app.middleware("http")(require_key)

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, err: BadRequest):  # noqa: ANN202
        return _error(err.message, err.status, err.kind)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "lit_opd",
                "max_model_len": scorer.context}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):  # noqa: ANN202
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise BadRequest("the request body is not JSON") from None
        # The forward and the JSON building block: off the event loop, so /health still answers.
        return await run_in_threadpool(_complete, scorer, name, body)

    return app


def _complete(scorer: Scorer, name: str, body: object):  # noqa: ANN202 - a starlette Response
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    top_n = _check_request(body, name, scorer.max_k)
    prompts = _prompts(body.get("prompt"), scorer.tokenizer)
    choices = scorer.choices(prompts, top_n)
    n_prompt = sum(map(len, prompts))
    usage = {"prompt_tokens": n_prompt, "completion_tokens": len(prompts),
             "total_tokens": n_prompt + len(prompts)}
    return _json({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": name, "choices": choices, "usage": usage})


# ----- the command ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lit_opd serve-teacher",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local model directory (save_pretrained) or hub id")
    parser.add_argument("--k", type=int, default=20, help="most prompt_logprobs a request may ask for (20)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (127.0.0.1: this machine only)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=[*DTYPES, "auto"])
    parser.add_argument("--quantization", default=None, choices=["4bit", "8bit"])
    parser.add_argument("--max-batch-tokens", type=int, default=4096,
                        help="padded tokens in one forward (4096); each holds a float32 row of log-probs "
                             "over the vocabulary, so lower it if the server runs out of memory")
    parser.add_argument("--served-model-name", default=None, help="the name clients send (default: --model)")
    parser.add_argument("--api-key-env", default=None,
                        help="NAME of an environment variable holding the key clients must send")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The API key (or None), after checking the numeric settings."""
    if args.k < 1:
        parser.error(f"--k {args.k}: must be >= 1 (the most prompt_logprobs a request may ask for)")
    if args.max_batch_tokens < 1:
        parser.error(f"--max-batch-tokens {args.max_batch_tokens}: must be >= 1")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: must be in 0..65535")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    if args.api_key_env is None:
        return None
    key = os.environ.get(args.api_key_env)
    if not key:
        parser.error(f"--api-key-env {args.api_key_env}: that environment variable is not set; "
                     f"export {args.api_key_env}=<key> first")
    return key


def serve_main(argv: list[str]) -> None:
    """Load the model, print where it is served, and serve until interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    api_key = _check_args(parser, args)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        parser.error("serve-teacher needs fastapi and uvicorn: pip install 'lit_opd[remote]'")
    spec = ModelSpec(path=args.model, dtype=args.dtype, quantization=args.quantization)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    try:
        model = freeze(load_causal_lm(spec))
        tokenizer = load_tokenizer(None, spec)
    except UserError as err:
        parser.error(str(err))
    if spec.quantization is None:  # bitsandbytes places its own weights
        model.to(device)
    else:
        device = next(model.parameters()).device
    name = args.served_model_name or args.model
    app = build_app(Scorer(model, tokenizer, device, args.k, args.max_batch_tokens), name, api_key)
    print(f"serve-teacher: serving {name} at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":  # pragma: no cover
    serve_main(sys.argv[1:])
