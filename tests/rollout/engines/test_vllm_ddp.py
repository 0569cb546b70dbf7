"""DDP and FSDP2 on CPU (2 processes, gloo), each rank with its own colocated vLLM engine: every rank syncs once
per update, samples its own completions, and vLLM's log-probs stay the rank's student's own. Runs the
script in a subprocess with a clean environment and a fresh MASTER_PORT (as tests/integration/test_ddp.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.scripts.procs import clean_env, free_port, run

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("ddp_vllm_fit.py")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_each_rank_rolls_out_with_its_own_synced_engine(tmp_path, strategy):
    """FSDP2: the student is sharded per layer, so each sync gathers the shards (all ranks) first."""
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = run([str(SCRIPT), str(tmp_path), strategy], timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, rec in enumerate(ranks):
        assert rec["rank"] == rank and rec["world_size"] == 2 and rec["steps"] == 3
        assert rec["sharded"] == (strategy == "fsdp2")
        assert rec["syncs"] == 3  # steps 0, 1, 2: one sync each
        assert rec["max_mismatch_kl"] < 1e-5
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the students (gathered) stayed equal
    for step0, step1 in zip(ranks[0]["completions"], ranks[1]["completions"]):
        assert step0 != step1  # each rank its own prompts and seeds
