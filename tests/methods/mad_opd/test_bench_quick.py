"""benchmarks/bench_mad_opd.py --quick runs end to end (tiny teachers, 4 steps per arm, one seed),
writes its plot into its own run folder, never RESULTS.md, and ends with its three RESULT lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_bench_mad_opd_quick(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_mad_opd.py"), "--quick", "--out-dir", str(tmp_path),
         "--results", str(results)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-3].startswith("RESULT madopd_sharp_vs_best_single ")
    assert lines[-2].startswith("RESULT madopd_vs_best_single ")
    assert lines[-1].startswith("RESULT routed_vs_best_single ")
    float(lines[-3].split()[-1]), float(lines[-2].split()[-1]), float(lines[-1].split()[-1])
    assert (tmp_path / "quick" / "mad_opd.png").exists()
    assert not results.exists()
