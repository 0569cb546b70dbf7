"""DDP and FSDP2 on CPU (gloo, 2 processes): each rank rolls out its own prompts, gradients are
averaged; under ModelParallelStrategy the student is sharded with ``fully_shard`` and still
generates (every decode step gathers its shards; ranks stop decoding together).

Runs ``strategy="ddp"`` only in a subprocess with a clean environment and a fresh MASTER_PORT
(in-process ddp under pytest re-runs pytest as rank 1 and leaks the process group).
"""

from __future__ import annotations

import json

import pytest

from tests.integration.scripts.procs import REPO, clean_env, free_port, run

pytestmark = pytest.mark.integration

SCRIPT = REPO / "tests" / "integration" / "scripts" / "ddp_fit.py"


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def ranks(request, tmp_path_factory, student_dir, teacher_dir):
    out = tmp_path_factory.mktemp(request.param)
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = run([str(SCRIPT), student_dir, teacher_dir, str(out), request.param], timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rec["sharded"] == (request.param == "fsdp2") for rec in records)
    return records


def test_both_ranks_trained_three_steps(ranks):
    for rank, rec in enumerate(ranks):
        assert rec["rank"] == rank and rec["world_size"] == 2
        assert rec["global_step"] == 3
        assert len(rec["steps"]) == 3
        assert all(step["source"] == "student" for step in rec["steps"])


def test_ranks_trained_on_different_prompts_and_rollouts(ranks):
    rows = [[r for step in rec["steps"] for r in step["rows"]] for rec in ranks]
    assert all(len(r) == 3 * 4 for r in rows)
    assert set(rows[0]).isdisjoint(rows[1]), "the distributed sampler gave both ranks the same prompts"
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert step0["completions"] != step1["completions"]


def test_ranks_end_with_identical_weights_that_moved(ranks):
    r0, r1 = ranks
    assert r0["initial"] == r1["initial"], "ranks started from different weights"
    assert r0["final"]["sha256"] == r1["final"]["sha256"], (r0["final"], r1["final"])
    assert r0["final"]["sha256"] != r0["initial"]["sha256"], "the student did not move"
    assert r0["final"]["sum"] != pytest.approx(r0["initial"]["sum"], abs=1e-6)


def test_evaluate_splits_prompts_over_ddp_ranks_and_agrees(ranks):
    """DDP: each rank greedily decodes its share of the validation prompts and the counts are summed;
    FSDP2 (every forward is a collective): each rank decodes all. Same accuracy as unsplit."""
    correct, count = ranks[0]["unsplit"]
    for rec in ranks:
        assert rec["evaluate"]["num_prompts"] == count == 11
        assert rec["evaluate"]["accuracy"] == pytest.approx(correct / count)
    decoded = [rec["evaluate"]["decoded_here"] for rec in ranks]
    assert decoded == ([11, 11] if ranks[0]["sharded"] else [6, 5])
