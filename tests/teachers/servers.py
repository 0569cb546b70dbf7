"""Real servers on loopback for the remote-teacher tests: start a process, wait until it answers,
stop it afterwards. Bounded in time; nothing listens beyond 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen | None, deadline_s: float) -> None:
    """Poll ``url`` until it answers HTTP 200; fail early if ``process`` exits."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no answer from {url} within {deadline_s:.0f} s")


@contextmanager
def running_server(argv: list[str], port: int, health_path: str = "/health", deadline_s: float = 120.0,
                   env: dict | None = None) -> Iterator[str]:
    """Run ``argv`` (a server listening on 127.0.0.1:``port``) until the block ends; yields its root
    URL. The server's output goes to a temporary log, shown if it fails to come up."""
    # An empty hub cache of its own: `transformers serve` (5.19) lists /v1/models by scanning the hub
    # cache and answers HTTP 500 where none exists (a fresh machine).
    with tempfile.TemporaryDirectory() as hub_cache, tempfile.TemporaryFile("w+") as log:
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                    "HF_HUB_CACHE": hub_cache, **(env or {})}
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env)
        root = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_until_up(root + health_path, process, deadline_s)
            except (RuntimeError, TimeoutError) as err:
                log.seek(0)
                raise RuntimeError(f"{err}\n--- server log ---\n{log.read()[-4000:]}") from None
            yield root
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def python_argv(*args: str) -> list[str]:
    """``python -m ...`` with this interpreter (the test's virtual environment)."""
    return [sys.executable, *args]
