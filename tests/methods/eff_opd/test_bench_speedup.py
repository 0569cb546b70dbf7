"""The EffOPD benchmarks' speed-up (benchmarks/effopd_runs.py ``compare``, shared by bench_effopd.py and
bench_effopd_regimes.py) on hand-made curves: both runs' first eval step at the lower of the two final
accuracies, so identical runs give 1."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[3]


def effopd_runs() -> ModuleType:  # the benchmarks' shared module, imported as the scripts import it
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module("effopd_runs")


def run(accs: list[float], every: int = 100) -> dict:
    """A run whose grid evals (every ``every`` steps from 0) read ``accs``; wall = 2 s a step."""
    return {"seed": 0, "points": [{"step": i * every, "kind": "grid", "acc": a, "wall": 2.0 * i * every,
                                   "cpu": 1.0 * i * every} for i, a in enumerate(accs)]}


def test_identical_runs_give_one_even_when_plain_wiggles() -> None:
    plain = run([0.0, 0.3, 0.62, 0.55, 0.60])  # above its final 0.60 already at step 200
    row = effopd_runs().compare(plain, run([0.0, 0.3, 0.62, 0.55, 0.60]))
    assert (row["plain_first"], row["eff_step"], row["speedup"], row["wall_speedup"]) == (200, 200, 1.0, 1.0)
    assert row["reached"] and row["common"] == 0.60


def test_effopd_first_at_plains_final_accuracy() -> None:
    row = effopd_runs().compare(run([0.0, 0.2, 0.4, 0.5, 0.6]), run([0.0, 0.4, 0.6, 0.6, 0.7]))
    assert (row["common"], row["plain_first"], row["eff_step"]) == (0.6, 400, 200)
    assert row["speedup"] == 2.0 and row["cpu_speedup"] == 2.0 and row["reached"]


def test_effopd_ending_lower_is_measured_at_its_own_final_accuracy() -> None:
    row = effopd_runs().compare(run([0.0, 0.5, 0.6, 0.7, 0.8]), run([0.0, 0.1, 0.2, 0.3, 0.5]))
    assert (row["common"], row["plain_first"], row["eff_step"]) == (0.5, 100, 400)
    assert row["speedup"] == 0.25 and not row["reached"]
