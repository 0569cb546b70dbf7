"""Run lit_opd in a subprocess the way a user would, safely under pytest.

Every child gets a clean environment (one torch thread, offline, the repo on PYTHONPATH), its own
session (so a timeout kills the whole process group, DDP ranks included) and a hard timeout.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
TINY_OPD = REPO / "configs" / "tiny" / "opd.yaml"


def clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment: no inherited MASTER_PORT / LOCAL_RANK / thread settings."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python <args>`` from the repo root in its own session (see :func:`finish`)."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=env or clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    """Wait for ``proc``; on timeout kill its whole process group (DDP ranks included) and fail."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"`{' '.join(proc.args)}` timed out after {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        if proc.poll() is None:  # pragma: no cover - only when communicate itself failed
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(args: list[str], timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python <args>`` from the repo root, with a hard timeout."""
    return finish(start(args, env), timeout)


def run_lit_opd(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return run(["-m", "lit_opd", *args], timeout=timeout)


def tiny_opd_config(
    path: Path, run_dir: Path, student: str, teacher: str, max_steps: int = 8, **model_args: object
) -> Path:
    """configs/tiny/opd.yaml with real model paths, a run dir and a fixed checkpoint dir."""
    cfg = copy.deepcopy(yaml.safe_load(TINY_OPD.read_text()))
    trainer = cfg["trainer"]
    trainer["max_steps"] = max_steps
    trainer["default_root_dir"] = str(run_dir)
    trainer["logger"]["init_args"]["save_dir"] = str(run_dir)
    trainer["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(run_dir / "checkpoints"),
                "every_n_train_steps": 2,
                "save_last": True,
                "save_top_k": -1,
            },
        }
    ]
    model = cfg["model"]["init_args"]
    model["student"] = student
    model["teacher"]["init_args"]["model"] = teacher
    model.update(model_args)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """Every row of every CSVLogger metrics.csv under ``run_dir`` (versions in order)."""
    import csv

    rows: list[dict[str, str]] = []
    for f in sorted(run_dir.glob("**/metrics.csv")):
        with f.open() as fh:
            rows.extend(csv.DictReader(fh))
    return rows


def step_values(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """``{step: value}`` of ``key`` from CSVLogger rows (blank cells skipped)."""
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key) not in (None, "")}
