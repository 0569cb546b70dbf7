"""benchmarks/bench_effopd_regimes.py --quick runs end to end (two learning rates, plain / EffOPD /
EffOPD with the loss score, and an SFT warm start; 40 steps, one seed), writes its plot into its own
run folder, never RESULTS.md, ends with its two RESULT lines, and re-renders the same table from its
cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def run_bench(tmp_path: Path, *extra: str) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_effopd_regimes.py"), "--quick",
         "--out-dir", str(tmp_path), "--results", str(tmp_path / "RESULTS.md"), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


@pytest.mark.slow
def test_bench_effopd_regimes_quick(tmp_path: Path) -> None:
    lines = run_bench(tmp_path)
    assert lines[-2].startswith("RESULT effopd_best_regime_speedup ")
    assert lines[-1].startswith("RESULT effopd_speedup ")
    float(lines[-2].split()[-1]), float(lines[-1].split()[-1])  # numbers, or nan when nothing is measurable
    assert lines[-3].startswith("best regime: ")
    regimes = ("| 2e-3 | 40 |", "| 2e-4 | 40 |", "| 2e-5, SFT warm start | 40 |")
    rows = [line for line in lines if line.startswith(regimes)]
    assert [r.split(" | ")[3] for r in rows] == ["greedy accuracy", "greedy accuracy", "loss on rollouts",
                                                "greedy accuracy"]
    # the warm-start regime trains its student by SFT first, saves it in HF format and starts from it
    assert (tmp_path / "quick" / "warm_student" / "config.json").exists()
    warm = json.loads((tmp_path / "quick" / "lr2e-5-warm" / "plain_seed0.json").read_text())
    assert warm["student"] == str(tmp_path / "quick" / "warm_student")
    for arm in ("plain", "effopd"):
        assert (tmp_path / "quick" / "lr2e-3" / f"{arm}_seed0.json").exists()
    assert (tmp_path / "quick" / "lr2e-4" / "effopd_loss_seed0.json").exists()
    assert (tmp_path / "quick" / "effopd_regimes.png").exists()
    assert not (tmp_path / "RESULTS.md").exists()
    # a second call finds every run cached and renders the same table and RESULT lines
    again = run_bench(tmp_path, "--report-only")
    tables = [[line for line in out if line.startswith("| ")] for out in (again, lines)]
    assert tables[0] == tables[1]
    assert again[-2:] == lines[-2:]
