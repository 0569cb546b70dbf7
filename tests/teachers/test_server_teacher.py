"""ServerTeacher against a real ``python -m lit_opd serve-teacher`` on loopback (one per module, behind
an API key): the answers have vLLM's shape, losses and whole training runs equal the in-process
HFTeacher's at the same top-k, setup fails with one clear error when the server is absent, refuses k or
the key, the key never reaches a file, and a run rides out injected HTTP faults."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lit_opd import HFTeacher, OPDModule, RolloutDataModule, SamplingParams, TaskPrompts
from lit_opd.objectives import Divergence, SampledReward
from lit_opd.tasks import AdditionTask
from lit_opd.teachers.server import ServerTeacher
from tests.helpers import make_rollout_batch, make_trainer
from tests.teachers.servers import free_port, python_argv, running_server

REPO = Path(__file__).resolve().parents[2]
TEACHER = str(REPO / "lit_opd/assets/addition/teacher")
STUDENT = str(REPO / "lit_opd/assets/addition/student")
NAME, K = "addition-teacher", 8
KEY_ENV, SECRET = "LIT_OPD_TEST_SERVE_KEY", "sk-serve-test-5f1c9e0a7d"


@pytest.fixture(scope="module")
def server() -> str:
    """serve-teacher's root URL; small --max-batch-tokens, so one request spans several forwards."""
    port = free_port()
    argv = python_argv("-m", "lit_opd", "serve-teacher", "--model", TEACHER, "--served-model-name", NAME,
                       "--k", str(K), "--port", str(port), "--device", "cpu", "--max-batch-tokens", "96",
                       "--api-key-env", KEY_ENV)
    with running_server(argv, port, env={KEY_ENV: SECRET, "PYTHONPATH": str(REPO)}) as root:
        yield root


@pytest.fixture(autouse=True)
def client_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def teacher_at(root: str, **overrides) -> ServerTeacher:
    settings = {"model": NAME, "k": K, "tokenizer": TEACHER, "api_key_env": KEY_ENV, **overrides}
    return ServerTeacher(root + "/v1", **settings)


def quickstart_data(batch_size: int = 64, num_rows: int = 1000) -> RolloutDataModule:
    """configs/quickstart.yaml's training data (no validation)."""
    task = AdditionTask(max_digits=3, reverse_answer=True)
    return RolloutDataModule(TaskPrompts(task, num_rows=num_rows, seed=4), val_size=0, batch_size=batch_size,
                             sampling=SamplingParams(max_new_tokens=6, temperature=1.0))


def opd(teacher, objective=None) -> OPDModule:  # noqa: ANN001
    objective = objective or Divergence(kind="jsd", beta=0.0, top_k=K)
    adamw = lambda params: torch.optim.AdamW(params, lr=0.002, weight_decay=0.0)  # noqa: E731
    return OPDModule(STUDENT, teacher, objective=objective, optimizer=adamw)


def post(root: str, body: dict, key: str | None = SECRET) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(root + "/v1/completions", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# ----- the protocol ------------------------------------------------------------------------------------
def test_completions_answer_in_vllms_shape(server):
    tok = HFTeacher(TEACHER).tokenizer
    prompts = [tok("12+3=")["input_ids"] + tok("51", add_special_tokens=False)["input_ids"],
               tok("4+56=")["input_ids"]]
    status, body = post(server, {"model": NAME, "prompt": prompts, "max_tokens": 1, "temperature": 0,
                                 "prompt_logprobs": K})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == sum(map(len, prompts))
    model = HFTeacher(TEACHER).model
    for ids, choice in zip(prompts, body["choices"]):
        logp_LV = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        assert choice["text"] == tok.decode([int(logp_LV[-1].argmax())])
        positions = choice["prompt_logprobs"]
        assert positions[0] is None and len(positions) == len(ids)
        for j in range(1, len(ids)):
            entry = positions[j]
            assert str(ids[j]) in entry and len(entry) in (K, K + 1)
            top = sorted(entry.values(), key=lambda v: v["rank"])[:K]
            assert [v["rank"] for v in top] == list(range(1, K + 1))
            for token, value in entry.items():
                assert abs(value["logprob"] - logp_LV[j - 1, int(token)].item()) < 1e-5
                assert value["rank"] == int((logp_LV[j - 1] >= logp_LV[j - 1, int(token)]).sum())
                assert value["decoded_token"] == tok.decode([int(token)])


def test_server_refuses_what_it_cannot_do(server):
    ask = {"model": NAME, "prompt": [[10, 7]], "max_tokens": 1}
    status, body = post(server, {**ask, "max_tokens": 4})
    assert status == 400 and "max_tokens" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    status, body = post(server, {**ask, "prompt_logprobs": K + 1})
    assert status == 400 and f"--k {K}" in body["error"]["message"]
    status, body = post(server, {**ask, "prompt": [[10, 100000]]})
    assert status == 400 and "token id" in body["error"]["message"]
    assert post(server, ask, key=None)[0] == 401 and post(server, ask, key="sk-wrong")[0] == 401
    with urllib.request.urlopen(server + "/health", timeout=10) as answer:  # health needs no key
        assert answer.status == 200


# ----- same numbers as the in-process teacher -------------------------------------------------------------
def test_losses_equal_the_in_process_teacher(server):
    """On a rollout of the quickstart student: top-k Divergence and SampledReward losses, HFTeacher vs
    ServerTeacher (5 rows per request: the last request is a partial one)."""
    remote = teacher_at(server, rows_per_request=5)
    remote.connect()
    data = quickstart_data(batch_size=32)
    for objective in (Divergence(kind="jsd", beta=0.0, top_k=K), SampledReward()):
        here, there = opd(HFTeacher(TEACHER), objective), opd(remote, objective)
        data.tokenizer = here.tokenizer
        data.setup("fit")
        batch = data.rollout(next(iter(data.train_dataloader())), here, "student", 0)
        out = remote.score(batch)
        assert out.answered_B.all() and out.topk_logp_BTK.dtype == torch.float32
        assert abs(here.score_loss(batch).item() - there.score_loss(batch).item()) < 1e-5
    mask_BT = batch.completion_mask_BT
    logp_BTV = HFTeacher(TEACHER).score(batch).logits_BTV.float().log_softmax(-1)
    top_logp_BTK, top_ids_BTK = logp_BTV.topk(K, dim=-1)
    assert torch.equal(out.topk_ids_BTK[mask_BT], top_ids_BTK[mask_BT])
    assert torch.allclose(out.topk_logp_BTK[mask_BT], top_logp_BTK[mask_BT], atol=1e-4)


class StepLosses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.values.append(float(outputs["loss"]))


def fit_losses(teacher, root: Path, steps: int = 5) -> list[float]:  # noqa: ANN001
    L.seed_everything(0)
    losses = StepLosses()
    make_trainer(root, max_steps=steps, callbacks=[losses]).fit(opd(teacher), datamodule=quickstart_data())
    return losses.values


def test_training_from_the_server_equals_in_process(server, tmp_path):
    remote = teacher_at(server)
    from_server = fit_losses(remote, tmp_path / "server")
    in_process = fit_losses(HFTeacher(TEACHER), tmp_path / "local")
    assert len(from_server) == 5
    assert max(abs(a - b) for a, b in zip(from_server, in_process)) < 1e-5, (from_server, in_process)
    assert remote.stats()["calls"] >= 5 and remote.stats()["failed"] == 0  # a request per step at least


# ----- setup errors -----------------------------------------------------------------------------------
def test_fit_fails_at_setup_naming_the_url_when_nothing_listens(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    module = opd(ServerTeacher(url, NAME, k=K))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="cannot reach the teacher server") as err:
        make_trainer(tmp_path, max_steps=1).fit(module, datamodule=quickstart_data(num_rows=100))
    message = str(err.value)
    assert time.monotonic() - start < 5 and message.count(url) == 1 and "serve-teacher" in message


def test_k_above_the_servers_limit_fails_at_connect(server):
    with pytest.raises(RuntimeError) as err:
        teacher_at(server, k=K + 1).connect()
    message = str(err.value)
    assert server in message and f"--k {K + 1}" in message and f"--max-logprobs {K + 1}" in message
    assert "lower ServerTeacher.k" in message


@pytest.mark.parametrize("key_env", [None, "LIT_OPD_TEST_WRONG_KEY"])
def test_a_missing_or_wrong_key_fails_at_connect_with_401(server, monkeypatch, key_env):
    monkeypatch.setenv("LIT_OPD_TEST_WRONG_KEY", "sk-wrong-4242")
    with pytest.raises(RuntimeError, match="HTTP 401") as err:
        teacher_at(server, api_key_env=key_env).connect()
    assert server in str(err.value) and SECRET not in str(err.value) and "sk-wrong-4242" not in str(err.value)


# ----- the key never reaches a file --------------------------------------------------------------------
def cli_config(tmp_path: Path, base_url: str) -> Path:
    """configs/opd/server_teacher.yaml, 3 steps, logs and checkpoints under ``tmp_path``."""
    config = yaml.safe_load((REPO / "configs/opd/server_teacher.yaml").read_text())
    run = str(tmp_path / "run")
    config["trainer"].update(max_steps=3, log_every_n_steps=1, default_root_dir=run, limit_val_batches=0)
    config["trainer"]["logger"]["init_args"]["save_dir"] = run
    checkpoint = config["trainer"]["callbacks"][-1]
    checkpoint["init_args"].update(dirpath=run + "/checkpoints", every_n_train_steps=1)
    config["trainer"]["callbacks"] = [checkpoint]
    init = config["model"]["init_args"]
    init["student"] = STUDENT
    init["teacher"]["init_args"].update(base_url=base_url, model=NAME, tokenizer=TEACHER, api_key_env=KEY_ENV)
    config["data"]["init_args"].update(batch_size=8)
    config["data"]["init_args"]["source"]["init_args"]["num_rows"] = 200
    config["data"]["init_args"]["val_source"]["init_args"]["num_rows"] = 16
    path = tmp_path / "server_teacher.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_key_never_reaches_a_file_or_the_printed_config(server, tmp_path, monkeypatch, capsys):
    from lit_opd.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["lit_opd"])
    config = cli_config(tmp_path, server + "/v1")
    cli_main(["fit", "--config", str(config)])
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(config), "--print_config"])
    printed, messages = capsys.readouterr()
    assert f"api_key_env: {KEY_ENV}" in printed and SECRET not in printed + messages
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.yaml", "metrics.csv", "last.ckpt"}
    assert [p for p in files if SECRET.encode() in p.read_bytes()] == []
    metrics = next(p for p in files if p.name == "metrics.csv").read_text()
    assert "teacher/calls" in metrics  # the run really went through the server


def test_a_server_without_prompt_logprobs_fails_at_connect():
    tiny_upstream = pytest.importorskip("tests.teachers.fault_proxy").tiny_upstream
    with tiny_upstream(models=(NAME,)) as plain:  # a plain OpenAI-style server: text only
        with pytest.raises(RuntimeError, match="without usable prompt_logprobs") as err:
            ServerTeacher(plain.root + "/v1", NAME, k=K).connect()
    assert plain.root in str(err.value) and "vllm serve" in str(err.value)


# ----- faults on the way -------------------------------------------------------------------------------
def test_a_request_that_keeps_failing_leaves_its_rows_unanswered(server):
    fault_proxy = pytest.importorskip("tests.teachers.fault_proxy").fault_proxy
    tok = HFTeacher(TEACHER).tokenizer
    prompts, completions = ("12+3=", "4+56=", "7+8=", "90+1="), ("51", "06", "51", "19")
    batch = make_rollout_batch(tok, prompts=prompts, completions=completions)
    with fault_proxy(server) as proxy:
        remote = teacher_at(proxy.root, rows_per_request=2, concurrency=1, retries=0)
        proxy.plan([("status", 500)], path="/completions")  # the first request (rows 0 and 1) fails
        out = remote.score(batch)
    assert out.answered_B.tolist() == [False, False, True, True] and remote.stats()["failed"] == 1
    assert torch.isfinite(out.topk_logp_BTK).all() and torch.isfinite(out.token_logp_BT).all()
    assert (out.token_logp_BT[2:][batch.completion_mask_BT[2:]] < 0).all()


def test_training_rides_out_http_500s_and_a_dropped_connection(server, tmp_path):
    fault_proxy = pytest.importorskip("tests.teachers.fault_proxy").fault_proxy
    from lightning.pytorch.callbacks import ModelCheckpoint

    with fault_proxy(server) as proxy:
        # The first /completions request is connect()'s probe; the faults hit training requests.
        faults = ["ok", ("status", 500), "drop", ("status", 500), "ok", ("status", 503)]
        proxy.plan(faults, path="/completions")
        remote = teacher_at(proxy.root, rows_per_request=4, backoff=0.01, timeout=20.0)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
        trainer = make_trainer(tmp_path, max_steps=6, callbacks=[checkpoints], enable_checkpointing=True)
        trainer.fit(opd(remote), datamodule=quickstart_data(batch_size=16, num_rows=200))
    assert trainer.global_step == 6
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"]
    logged = trainer.callback_metrics
    assert logged["teacher/retries"] == 4 and logged["teacher/http_5xx"] == 3
    assert logged["teacher/connection_errors"] == 1 and logged["teacher/failed"] == 0
    saved = torch.load(tmp_path / "ckpt/epoch=0-step=6.ckpt", weights_only=False)["lit_opd"]["teacher_stats"]
    assert saved["retries"] == 4
