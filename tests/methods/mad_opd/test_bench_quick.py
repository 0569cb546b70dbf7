"""benchmarks/bench_mad_opd.py --quick runs end to end (tiny teachers, 4 steps per arm, one seed),
writes its plot into its own run folder, never RESULTS.md, and ends with its three RESULT lines; and the
benchmarks' shared harness (benchmarks/common.py) that its RESULTS.md section writer became: a section
replaced in place by its heading, ``--no-record`` and the RESULT line."""

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


# ----- the benchmarks' shared harness (benchmarks/common.py), which bench_mad_opd.py's section writer became
def harness():  # noqa: ANN201 - the module, imported as the benchmark scripts import it
    import importlib

    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module("common")


def test_section_with_its_heading_is_replaced_in_place_and_others_kept(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    old = "## Bench X — 2026-11-26 — 2-core CPU\n\nstale\n\n### its subsection\n\nstale too\n"
    other_machine = "## Bench X — 2026-11-26 — NVIDIA H200\n\nkept\n"
    results.write_text(f"# Results\n\n## Before\n\nkept\n\n{old}\n{other_machine}\n## After\n\nkept\n")
    done = harness().write_section(results, "\n## Bench X — 2026-12-07 — 2-core CPU\n\nfresh\n")
    text = results.read_text()
    assert done == "replaced its section in"
    assert "stale" not in text and text.count("kept") == 3 and "fresh" in text
    assert text.index("## Before") < text.index("fresh") < text.index("NVIDIA H200") < text.index("## After")
    assert "fresh\n\n## Bench X — 2026-11-26 — NVIDIA H200" in text  # one blank line between sections


def test_section_without_a_match_is_appended_and_a_doubled_heading_refused(tmp_path: Path) -> None:
    common, results = harness(), tmp_path / "RESULTS.md"
    assert common.write_section(results, "## Bench Y — 2026-12-07 — CPU\n\nfirst\n") == "appended to"
    assert common.write_section(results, "## Bench Z — 2026-12-07 — CPU\n\nsecond\n") == "appended to"
    first, second = "## Bench Y — 2026-12-07 — CPU\n\nfirst\n", "## Bench Z — 2026-12-07 — CPU\n\nsecond\n"
    assert results.read_text() == first + "\n" + second
    results.write_text(results.read_text() * 2)
    with pytest.raises(SystemExit, match="2 sections headed"):
        common.write_section(results, "## Bench Y — 2026-12-08 — CPU\n\nthird\n")


def test_no_record_flag_and_its_deprecated_alias(tmp_path: Path) -> None:
    import argparse

    common = harness()
    parser = argparse.ArgumentParser()
    common.add_record_options(parser)
    assert not parser.parse_args([]).no_record and parser.parse_args([]).results == common.RESULTS
    assert parser.parse_args(["--no-record"]).no_record
    with pytest.warns(FutureWarning, match="--no-append is deprecated"):
        assert parser.parse_args(["--no-append"]).no_record
    args = parser.parse_args(["--no-record", "--results", str(tmp_path / "R.md")])
    common.record(args, "## Bench — 2026-12-07\n")
    assert not (tmp_path / "R.md").exists()


def test_result_line() -> None:
    common = harness()
    assert common.result_line("x_gain", 0.123456) == "RESULT x_gain 0.1235"
    line = common.result_line("turn_accuracy", "0:", 0.5, 0.75, digits=3)
    assert line == "RESULT turn_accuracy 0: 0.500 0.750"
    assert common.result_line("onset_error", 2) == "RESULT onset_error 2"
