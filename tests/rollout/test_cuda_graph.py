"""The CUDA-graph decode step (needs a GPU; skipped elsewhere): a replayed graph gives the tokens
and log-probs of the eager lean step and of the model's own forward, in fp32 and under bf16
autocast, with per-row EOS, several samples per prompt and a new capture per rollout."""

from __future__ import annotations

import pytest
import torch

from pathlib import Path

from transformers import AutoModelForCausalLM

from lit_opd.rollout.sampling import sample
from lit_opd.types import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
STUDENT = Path(__file__).resolve().parents[2] / "lit_opd/assets/addition/student"


@pytest.fixture(scope="module")
def model():
    """The quickstart student: trained, so its distributions are peaked (a random model's near-ties
    would let bf16 rounding flip argmaxes between two correct engines) and it stops at EOS."""
    return AutoModelForCausalLM.from_pretrained(STUDENT).cuda().eval()


def _run(model, tok, texts, autocast, **params):
    enc = tok(texts, padding=True, return_tensors="pt").to("cuda")
    runs = {}
    for name, kwargs in {"graph": dict(decode_step="lean"), "eager": dict(decode_step="lean", cuda_graph=False),
                         "hf": dict(decode_step="hf")}.items():
        generator = torch.Generator("cuda").manual_seed(5)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            runs[name] = sample(model, enc.input_ids, enc.attention_mask, SamplingParams(**params, **kwargs), [3], 0,
                                generator=generator)
    return runs


@pytest.mark.parametrize("autocast", [False, True])
def test_graph_replay_matches_eager_and_the_model(model, char_tok, autocast):
    texts = ["12+345=", "7+8=", "99+1=", "1+1="]
    for params in (dict(max_new_tokens=12, greedy=True), dict(max_new_tokens=12, num_samples=3, temperature=1.0)):
        runs = _run(model, char_tok, texts, autocast, **params)
        for other in ("eager", "hf"):
            assert torch.equal(runs["graph"].tokens_BT, runs[other].tokens_BT), other
            assert torch.equal(runs["graph"].mask_BT, runs[other].mask_BT), other
            tol = 3e-2 if autocast else 1e-4
            torch.testing.assert_close(runs["graph"].logp_BT, runs[other].logp_BT, atol=tol, rtol=0)


def test_rows_that_stop_early_do_not_disturb_the_others(model, char_tok):
    """Short answers finish first and keep replaying the graph masked; every row equals the row
    decoded alone."""
    trained = model
    texts = ["1+2=", "123+456=", "99+999="]
    both = _run(trained, char_tok, texts, False, max_new_tokens=10, greedy=True)["graph"]
    lengths = both.mask_BT.sum(1)
    assert (lengths < 10).all() and len(set(lengths.tolist())) > 1  # EOS at different steps
    for i, text in enumerate(texts):
        alone = _run(trained, char_tok, [text], False, max_new_tokens=10, greedy=True)["graph"]
        assert torch.equal(both.tokens_BT[i][both.mask_BT[i]], alone.tokens_BT[0][alone.mask_BT[0]])
