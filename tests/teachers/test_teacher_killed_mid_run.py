"""Issue 24 end to end: a real ``python -m lit_opd serve-teacher`` killed in the middle of a fit. The
steps after the kill get no answer; their updates are skipped, so the student and AdamW's state stay
exactly as after the last answered step, and after ``HealthGuard.max_unsupervised_steps`` (default 5)
of them the run stops with one line naming the server's URL instead of training on zero gradients."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_opd import OPDModule, RolloutDataModule, SamplingParams, TaskPrompts
from lit_opd.errors import TeacherUnreachable, user_message
from lit_opd.objectives import Divergence
from lit_opd.tasks import AdditionTask
from lit_opd.teachers.server import ServerTeacher
from tests.callbacks.test_unsupervised_steps import snapshot
from tests.helpers import make_trainer
from tests.teachers.servers import free_port, python_argv, wait_until_up

REPO = Path(__file__).resolve().parents[2]
TEACHER = str(REPO / "lit_opd/assets/addition/teacher")
STUDENT = str(REPO / "lit_opd/assets/addition/student")
NAME, K, KILL_AT = "addition-teacher", 8, 3


class KillServer(L.Callback):
    """Terminates the server once ``KILL_AT`` steps are done, keeping the state they left (the last
    answered step) and the teacher's missing fraction of every step."""

    def __init__(self, server: subprocess.Popen) -> None:
        self.server, self.missing, self.at_kill, self.optimizer = server, [], None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.missing.append(float(pl_module.step_terms["teacher_missing_frac"]))
        self.optimizer = trainer.optimizers[0]
        if trainer.global_step == KILL_AT:
            self.at_kill = snapshot(pl_module, self.optimizer)
            self.server.terminate()
            self.server.wait(timeout=30)


def test_a_server_killed_mid_run_freezes_the_student_and_stops_naming_its_url(tmp_path):
    port = free_port()
    argv = python_argv("-m", "lit_opd", "serve-teacher", "--model", TEACHER, "--served-model-name", NAME,
                       "--k", str(K), "--port", str(port), "--device", "cpu")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        try:
            wait_until_up(f"http://127.0.0.1:{port}/health", server, deadline_s=120)
            url = f"http://127.0.0.1:{port}/v1"
            teacher = ServerTeacher(url, NAME, k=K, tokenizer=TEACHER, timeout=5.0, retries=1, backoff=0.01)
            adamw = lambda params: torch.optim.AdamW(params, lr=0.002)
            module = OPDModule(STUDENT, teacher, objective=Divergence(kind="jsd", beta=0.0, top_k=K),
                               optimizer=adamw)
            data = RolloutDataModule(TaskPrompts(AdditionTask(max_digits=3, reverse_answer=True), num_rows=200,
                                                 seed=4), val_size=0, batch_size=8,
                                     sampling=SamplingParams(max_new_tokens=6))
            kill = KillServer(server)
            trainer = make_trainer(tmp_path, max_steps=40, callbacks=[kill])
            L.seed_everything(0)
            with pytest.raises(TeacherUnreachable) as stopped:
                trainer.fit(module, datamodule=data)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(timeout=30)
    message = str(stopped.value)
    # answered up to the kill (so the freeze below is not vacuous), then 4 skipped steps and the 5th stops
    assert kill.missing == [0.0] * KILL_AT + [1.0] * 4
    assert message.startswith(f"At global step {KILL_AT + 5 - 1}: ServerTeacher at {url} answered none of the "
                              "rows of the last 5 training steps")
    assert "\n" not in message and message.count(url) == 1 and user_message(stopped.value) == message
    assert teacher.stats()["failed"] >= 5 and teacher.stats()["connection_errors"] >= 5
    after = snapshot(module, kill.optimizer)
    assert after.keys() == kill.at_kill.keys() and any(k.startswith("exp_avg ") for k in after)
    assert [k for k in after if not torch.equal(after[k], kill.at_kill[k])] == []
