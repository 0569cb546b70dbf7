"""benchmarks/bench_quickstart_seeds.py on a 4-step budget and 2 seeds: it runs the shipped OPD and SFT
quickstart configs, caches each run, writes its section into a RESULTS.md (replacing its own, keeping
the others), draws its plot, ends with the two paired RESULT lines, and re-renders from the cache
without running anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
HEADING = "## Quickstart across seeds: OPD against SFT, paired"


def run_bench(tmp_path: Path, *extra: str) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_quickstart_seeds.py"), "--steps", "4",
         "--seeds", "0", "1", "--val-rows", "64", "--jobs", "1", "--cache-dir", str(tmp_path / "cache"),
         "--results", str(tmp_path / "RESULTS.md"), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


def test_bench_quickstart_seeds_records_pairs_and_rerenders_from_cache(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    old = f"{HEADING} — 2026-01-01 — 2-core CPU (this project's dev machine)"  # an earlier run's section
    results.write_text(f"# Results\n\n## Before\n\nkept\n\n{old}\n\nstale\n\n## After\n\nkept\n")
    lines = run_bench(tmp_path, "--plot", str(tmp_path / "seeds.png"))

    runs = [json.loads(path.read_text()) for path in (tmp_path / "cache").glob("*.json")]
    cached = {f"{run['method']}{run['seed']}": run for run in runs}
    assert sorted(cached) == ["OPD0", "OPD1", "SFT0", "SFT1"]
    diffs = [cached[f"OPD{s}"]["after"] - cached[f"SFT{s}"]["after"] for s in (0, 1)]
    assert lines[-2] == f"RESULT quickstart_opd_minus_sft_paired_min {min(diffs):.4f}"
    assert lines[-1] == f"RESULT quickstart_opd_minus_sft_paired_mean {sum(diffs) / 2:.4f}"
    assert all(run["overrides"][:4] == ["--seed_everything", str(run["seed"]), "--data.init_args.seed",
                                        str(run["seed"])] for run in cached.values())
    assert (tmp_path / "seeds.png").stat().st_size > 0
    text = results.read_text()
    assert text.count(HEADING) == 1 and "stale" not in text and text.count("kept") == 2
    assert "4 of 4 runs ran in this call" in text and "![OPD against SFT per seed](seeds.png)" in text
    assert text.index("## Before") < text.index(HEADING) < text.index("## After")

    # a re-render reads every run from the cache; a config that differs only in comments is the same run
    commented = tmp_path / "quickstart.yaml"
    commented.write_text("# a comment\n" + (ROOT / "configs" / "quickstart.yaml").read_text())
    again = run_bench(tmp_path, "--no-record", "--opd-config", str(commented))
    assert "0 of 4 runs ran in this call" in "\n".join(again)
    assert again[-2:] == lines[-2:]
    assert results.read_text() == text  # --no-record leaves RESULTS.md alone
    assert (tmp_path / "cache" / "quickstart_seeds.png").exists()
