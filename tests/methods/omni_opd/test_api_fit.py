"""A short OmniOPD fit through APITeacher against a real server: `transformers serve` running the
trained addition teacher on loopback. The teacher's request counters reach the logs every step."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai", reason="APITeacher needs the openai SDK: pip install 'lit_opd[remote]'")
pytest.importorskip("fastapi", reason="the test server needs transformers[serving]: pip install lit_opd[dev]")

from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from lit_opd import APITeacher, RolloutDataModule, SamplingParams, TaskPrompts  # noqa: E402
from lit_opd.methods.omni_opd import OmniOPDModule, SpeculativeVerification  # noqa: E402
from lit_opd.tasks import AdditionTask  # noqa: E402
from tests.helpers import make_trainer  # noqa: E402
from tests.teachers.servers import free_port, running_server  # noqa: E402

ASSETS = Path(__file__).resolve().parents[3] / "lit_opd" / "assets" / "addition"


@pytest.fixture(scope="module")
def served():
    """(base_url, model name) of the trained teacher served on loopback (completions only)."""
    script = Path(sys.executable).parent / "transformers"
    if not script.exists():
        pytest.skip(f"no `transformers` CLI next to {sys.executable}: pip install 'lit_opd[dev]'")
    port = free_port()
    model = str(ASSETS / "teacher")
    argv = [str(script), "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
            "--log-level", "warning"]
    with running_server(argv, port) as root:
        yield root + "/v1", model


def test_omni_opd_fits_through_an_api_teacher_and_logs_its_counters(served, tmp_path):
    base_url, model = served
    teacher = APITeacher(base_url, model, mode="completions", timeout=10.0, retries=1, backoff=0.01)
    module = OmniOPDModule(str(ASSETS / "student"), teacher, objective=SpeculativeVerification(
        chunk_tokens=2, max_audits=1, num_continuations=2))
    data = RolloutDataModule(TaskPrompts(AdditionTask(1, 2, reverse_answer=True), num_rows=8), val_size=0,
                             batch_size=4, sampling=SamplingParams(max_new_tokens=4))
    trainer = make_trainer(tmp_path, 2, logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=1)
    trainer.fit(module, data)
    with next(tmp_path.glob("**/metrics.csv")).open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/loss")]
    assert len(rows) == 2
    assert float(rows[-1]["teacher/calls"]) >= 2 and float(rows[-1]["teacher/failed"]) == 0
    assert all(float(r["train/audits_per_seq"]) > 0 and float(r["train/audits_dropped"]) == 0 for r in rows)
    assert 0 < float(rows[-1]["train/target_mean"]) <= 1
