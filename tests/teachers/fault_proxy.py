"""A fault-injecting HTTP proxy on loopback for the remote-teacher tests, plus a tiny OpenAI-style upstream
to put behind it. Standard library only.

Usage::

    with tiny_upstream() as upstream, fault_proxy(upstream.root) as proxy:
        proxy.plan([("status", 500), "drop"], path="/completions")
        remote = RemoteCalls(base_url=proxy.root + "/v1", owner="TestTeacher", timeout=0.5)
        ...

``fault_proxy(upstream_root)`` forwards every request (method, path, headers, body) to ``upstream_root``
(e.g. ``http://127.0.0.1:8000``, the server's root, without ``/v1``) and relays its answer, except for the
requests its plan names a fault for. ``proxy.plan(faults, path=None)`` replaces the plan: a list used up
one entry per request, after which every request is forwarded. With ``path`` set, only requests whose path
contains it use up the plan (e.g. ``path="/completions"`` lets ``/health`` and ``/v1/models`` through).

Faults:

    "ok"                       forward as usual
    ("slow", seconds)          wait, then forward: a client with a shorter timeout gives up meanwhile
    ("status", code)           answer HTTP ``code`` with an OpenAI-style JSON error body
    ("status", code, seconds)  the same with a ``Retry-After: seconds`` header (for 429)
    "malformed"                HTTP 200, content-type application/json, a body that is not JSON
    "wrong_shape"              HTTP 200 with valid JSON lacking the expected fields: ``{"foo": 1}``
    ("wrong_shape", obj)       the same with ``obj`` as the JSON body, e.g. ``{"choices": []}``
    "drop"                     close the connection without sending anything

Read back: ``proxy.root`` (``http://127.0.0.1:PORT``), ``proxy.seen`` (requests received),
``proxy.max_in_flight`` (most requests handled at once), ``proxy.requests`` (``(method, path, fault)``
for each request). Limits: an answer is relayed whole once the upstream has finished it (a streamed
answer arrives in one piece), and request bodies must carry a Content-Length (HTTP clients send one).

Leaving the block stops the server within a fraction of a second: waits of "slow" faults end early,
open keep-alive connections are closed, and every thread is a daemon, so nothing keeps pytest waiting.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Headers that belong to one connection, not to the message; Content-Length is recomputed.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailer", "transfer-encoding", "upgrade", "host", "content-length"})
_SET_BY_US = frozenset({"server", "date"})
_ARGS = {"ok": (0, 0), "malformed": (0, 0), "drop": (0, 0), "slow": (1, 1), "status": (1, 2),
         "wrong_shape": (0, 1)}


# ----- a loopback server that stops quickly -------------------------------------------------------
class _InFlight:
    """Counts requests being handled now and the most seen at once."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1


class _Loopback(ThreadingHTTPServer):
    """A threading server on 127.0.0.1 (free port) that remembers its open connections, so that
    stopping it can close them instead of waiting for idle keep-alive clients."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler], owner: object) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.owner, self.stopping, self.in_flight = owner, threading.Event(), _InFlight()
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def process_request(self, request, client_address) -> None:  # noqa: ANN001 - socketserver's API
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:  # noqa: ANN001
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@contextmanager
def _serving(server: _Loopback) -> Iterator[None]:
    """Serve in a daemon thread until the block ends; then stop quickly."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name=f"{type(server.owner).__name__}:{server.server_address[1]}")
    thread.start()
    try:
        yield
    finally:
        server.stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler, quiet, that routes every method to ``answer``."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection ends by itself after this

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:  # the client went away (timed out, or we dropped it): nothing to answer
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._route()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET  # noqa: N815

    def _route(self) -> None:
        body = self._read_body()
        with self.server.in_flight:
            self.answer(body)

    def answer(self, body: bytes) -> None:
        raise NotImplementedError

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> None:
        headers = list(headers)
        self.send_response(status)
        if not any(name.lower() == "content-type" for name, _ in headers):
            headers.append(("Content-Type", "application/json"))
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj: object, headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send(status, json.dumps(obj).encode(), headers)


def _error(status: int, message: str) -> dict:
    """An error body in the shape OpenAI-compatible servers use."""
    return {"error": {"message": message, "type": "fault_proxy" if status < 500 else "server_error",
                      "code": status}}


# ----- the proxy ----------------------------------------------------------------------------------
class FaultProxy:
    """The proxy's state: its plan, and what it saw. Made by :func:`fault_proxy`."""

    def __init__(self, upstream_root: str, upstream_timeout: float = 60.0) -> None:
        self.upstream = urlsplit(upstream_root)
        if self.upstream.scheme not in ("http", "https") or not self.upstream.hostname:
            raise ValueError(f"upstream_root={upstream_root!r} must look like http://127.0.0.1:8000")
        self.upstream_timeout = upstream_timeout
        self.root = ""
        self.requests: list[tuple[str, str, tuple]] = []
        self._faults: list[tuple] = []
        self._path: str | None = None
        self._lock = threading.Lock()
        self._server: _Loopback | None = None

    def plan(self, faults: Iterable[str | tuple], path: str | None = None) -> None:
        """Replace the plan: ``faults`` used up one per request (whose path contains ``path``, if set)."""
        checked = [_as_fault(fault) for fault in faults]
        with self._lock:
            self._faults, self._path = checked, path

    @property
    def seen(self) -> int:
        with self._lock:
            return len(self.requests)

    @property
    def max_in_flight(self) -> int:
        return self._server.in_flight.most if self._server else 0

    def next_fault(self, method: str, path: str) -> tuple:
        """The fault for this request (and record it)."""
        with self._lock:
            applies = self._path is None or self._path in path.split("?", 1)[0]
            fault = self._faults.pop(0) if applies and self._faults else ("ok",)
            self.requests.append((method, path, fault))
        return fault


def _as_fault(fault: str | tuple) -> tuple:
    """``fault`` as a tuple, after checking it is one the proxy knows."""
    parts = (fault,) if isinstance(fault, str) else tuple(fault)
    low, high = _ARGS.get(parts[0] if parts else None, (1, 0))  # (1, 0): no length fits
    if not low <= len(parts) - 1 <= high:
        raise ValueError(f"unknown fault {fault!r}; known: 'ok', 'malformed', 'drop', 'wrong_shape', "
                         "('wrong_shape', obj), ('slow', s), ('status', code), "
                         "('status', code, retry_after_s)")
    return parts


class _ProxyHandler(_Handler):
    def answer(self, body: bytes) -> None:
        proxy: FaultProxy = self.server.owner
        kind, *args = proxy.next_fault(self.command, self.path)
        if kind == "drop":
            self.close_connection = True  # nothing written: the client sees the connection close
        elif kind == "slow":
            if self.server.stopping.wait(args[0]):
                self.close_connection = True  # shutting down: give up instead of forwarding
            else:
                self._forward(proxy, body)
        elif kind == "status":
            retry = [("Retry-After", f"{args[1]:g}")] if len(args) > 1 else []
            self.send_json(args[0], _error(args[0], f"fault_proxy: planned HTTP {args[0]}"), retry)
        elif kind == "malformed":
            self.send(200, b'{"id": "cmpl-0", "choices": [{"text": "cut off')
        elif kind == "wrong_shape":
            self.send_json(200, args[0] if args else {"foo": 1})
        else:
            self._forward(proxy, body)

    def _forward(self, proxy: FaultProxy, body: bytes) -> None:
        up = proxy.upstream
        connection_type = http.client.HTTPSConnection if up.scheme == "https" else http.client.HTTPConnection
        connection = connection_type(up.hostname, up.port, timeout=proxy.upstream_timeout)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        sends_body = body or self.command in ("POST", "PUT", "PATCH")
        try:
            connection.request(self.command, up.path.rstrip("/") + self.path,
                               body=body if sends_body else None, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except OSError as err:
            self.send_json(502, _error(502, f"fault_proxy: upstream {up.geturl()} failed: {err!r}"))
            return
        finally:
            connection.close()
        skip = _HOP_BY_HOP | _SET_BY_US
        self.send(response.status, data, [(k, v) for k, v in response.getheaders() if k.lower() not in skip])


@contextmanager
def fault_proxy(upstream_root: str, upstream_timeout: float = 60.0) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of ``upstream_root`` until the block ends (see the module docstring)."""
    proxy = FaultProxy(upstream_root, upstream_timeout)
    proxy._server = _Loopback(_ProxyHandler, proxy)
    proxy.root = proxy._server.root
    with _serving(proxy._server):
        yield proxy


# ----- a tiny OpenAI-style upstream ---------------------------------------------------------------
class TinyUpstream:
    """What the tiny upstream serves and what it saw. Made by :func:`tiny_upstream`.

    ``delay_s``: each completion waits this long (to measure concurrency). ``fail_with``: an HTTP status
    that every completion gets instead, whose error message quotes the Authorization header received
    (as some real APIs quote a wrong key). ``auth_seen``: the Authorization header of each request.
    """

    def __init__(self, models: tuple[str, ...] = ("m",), delay_s: float = 0.0) -> None:
        self.models, self.delay_s = models, delay_s
        self.fail_with: int | None = None
        self.auth_seen: list[str | None] = []
        self.root = ""
        self._server: _Loopback | None = None

    @property
    def max_in_flight(self) -> int:
        return self._server.in_flight.most if self._server else 0


class _UpstreamHandler(_Handler):
    def answer(self, body: bytes) -> None:
        upstream: TinyUpstream = self.server.owner
        upstream.auth_seen.append(self.headers.get("Authorization"))
        path = self.path.split("?", 1)[0]
        if self.command == "GET" and path in ("/health", "/v1/health"):
            self.send_json(200, {"status": "ok"})
        elif self.command == "GET" and path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "me"} for name in upstream.models]})
        elif self.command == "POST" and path == "/v1/completions":
            self._complete(upstream, json.loads(body or b"{}"))
        else:
            self.send_json(404, _error(404, f"tiny upstream: no route {self.command} {path}"))

    def _complete(self, upstream: TinyUpstream, request: dict) -> None:
        if upstream.fail_with is not None:
            key = self.headers.get("Authorization", "")
            self.send_json(upstream.fail_with, _error(upstream.fail_with, f"refused; you sent {key!r}"))
            return
        if upstream.delay_s and self.server.stopping.wait(upstream.delay_s):
            self.close_connection = True
            return
        self.send_json(200, completion(str(request.get("prompt", "")), request.get("model", "m"),
                                       int(request.get("max_tokens") or 1)))


def completion(prompt: str, model: str, max_tokens: int = 1) -> dict:
    """A valid OpenAI completion body whose text echoes ``prompt``."""
    return {"id": "cmpl-tiny", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": f"echo:{prompt}", "finish_reason": "length", "logprobs": None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": max_tokens, "total_tokens": 1 + max_tokens}}


@contextmanager
def tiny_upstream(models: tuple[str, ...] = ("m",), delay_s: float = 0.0) -> Iterator[TinyUpstream]:
    """A :class:`TinyUpstream` on loopback until the block ends: ``GET /v1/models``, ``GET /health``,
    ``POST /v1/completions`` (non-streaming)."""
    upstream = TinyUpstream(models, delay_s)
    upstream._server = _Loopback(_UpstreamHandler, upstream)
    upstream.root = upstream._server.root
    with _serving(upstream._server):
        yield upstream
