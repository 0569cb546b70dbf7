"""The rollout sampler: greedy equals HF generate, padding does not change a row, EOS stops a row,
and the returned log-probs are those of the sampling distribution."""

from __future__ import annotations

import pytest
import torch

from lit_opd.rollout.sampling import filter_logits, sample
from lit_opd.types import SamplingParams
from tests.helpers import make_tiny_model


@pytest.fixture(scope="module")
def model(char_tok):
    return make_tiny_model(len(char_tok), hidden=32, layers=2, seed=3).eval()


def _prompts(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def test_greedy_matches_hf_generate(model, char_tok):
    ids, mask = _prompts(char_tok, ["12+345=", "7+8=", "99+1="])
    out = sample(model, ids, mask, SamplingParams(max_new_tokens=8, greedy=True), [3], 0)
    ref = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=3, pad_token_id=0
    )[:, ids.shape[1] :]
    T = out.tokens_BT.shape[1]
    assert torch.equal(out.tokens_BT, ref[:, :T])
    assert (ref[:, T:] == 0).all()  # HF only padded after every row stopped


def test_left_padding_does_not_change_a_row(model, char_tok):
    params = SamplingParams(max_new_tokens=6, greedy=True)
    ids, mask = _prompts(char_tok, ["5+5="])
    alone = sample(model, ids, mask, params, [3], 0)
    ids2, mask2 = _prompts(char_tok, ["5+5=", "123+456="])  # forces 4 pads on row 0
    batched = sample(model, ids2, mask2, params, [3], 0)
    n = int(alone.mask_BT[0].sum())
    assert torch.equal(alone.tokens_BT[0, :n], batched.tokens_BT[0, :n])
    torch.testing.assert_close(alone.logp_BT[0, :n], batched.logp_BT[0, :n], atol=1e-5, rtol=0)


def test_rows_stop_at_eos_and_pad_after(char_tok):
    model = make_tiny_model(len(char_tok), hidden=32, layers=2, seed=3).eval()
    ids, mask = _prompts(char_tok, ["1+1=", "22+22="])
    bias = torch.zeros(len(char_tok))
    bias[3] = 50.0  # make EOS (id 3) overwhelmingly likely after any token
    hook = model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    out = sample(model, ids, mask, SamplingParams(max_new_tokens=5, temperature=1.0), [3], 0)
    hook.remove()
    assert out.tokens_BT.shape[1] == 1  # every row stopped at once: no wasted steps
    assert (out.tokens_BT[:, 0] == 3).all() and out.mask_BT.all() and not out.truncated_B.any()


def test_truncated_rows_are_flagged(model, char_tok):
    ids, mask = _prompts(char_tok, ["1+2="])
    out = sample(model, ids, mask, SamplingParams(max_new_tokens=3, greedy=True, stop_at_eos=False), [3], 0)
    assert out.tokens_BT.shape == (1, 3) and out.truncated_B.all() and out.mask_BT.all()


def test_num_samples_rows_are_adjacent_and_seeded(model, char_tok):
    ids, mask = _prompts(char_tok, ["1+2=", "30+4="])
    params = SamplingParams(max_new_tokens=5, num_samples=3)
    a = sample(model, ids, mask, params, [3], 0, generator=torch.Generator().manual_seed(0))
    b = sample(model, ids, mask, params, [3], 0, generator=torch.Generator().manual_seed(0))
    assert a.tokens_BT.shape[0] == 6
    assert torch.equal(a.tokens_BT, b.tokens_BT)  # same seed, same samples


def test_sampler_logprobs_are_the_policy_logprobs_at_temperature_one(model, char_tok):
    ids, mask = _prompts(char_tok, ["12+3=", "4+56="])
    out = sample(model, ids, mask, SamplingParams(max_new_tokens=6), [3], 0, generator=torch.Generator().manual_seed(1))
    full_ids = torch.cat([ids, out.tokens_BT], 1)
    full_mask = torch.cat([mask, out.mask_BT.long()], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=pos).logits
    logp = logits[:, ids.shape[1] - 1 : -1].log_softmax(-1).gather(-1, out.tokens_BT[..., None]).squeeze(-1)
    torch.testing.assert_close(logp[out.mask_BT], out.logp_BT[out.mask_BT], atol=1e-5, rtol=0)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top2 = filter_logits(logits, SamplingParams(top_k=2))
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    nucleus = filter_logits(logits, SamplingParams(top_p=0.7))  # 0.5 then 0.3 reaches 0.8 >= 0.7
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()


def test_sampling_frequencies_follow_the_distribution(char_tok):
    """2000 one-token draws at temperature 1 match the model's next-token distribution."""
    model = make_tiny_model(len(char_tok), hidden=32, layers=1, seed=5).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # a peaked distribution so few tokens matter
    ids, mask = _prompts(char_tok, ["7="])
    params = SamplingParams(max_new_tokens=1, num_samples=2000)
    out = sample(model, ids, mask, params, [3], 0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=mask).logits[0, -1].softmax(-1)
    freq = torch.bincount(out.tokens_BT[:, 0], minlength=probs.numel()).float() / 2000
    top = probs.topk(3).indices
    assert (freq[top] - probs[top]).abs().max() < 0.04  # ~4 standard errors at n=2000


def _llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=3, attention_bias=True,
    )).eval()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_lean_engine_matches_the_model_forward(char_tok, arch):
    from lit_opd.rollout import lean_step as engine

    model = make_tiny_model(len(char_tok), 32, 2, seed=6).eval() if arch == "qwen3" else _llama(len(char_tok))
    assert engine.supported(model, 64)
    ids, mask = _prompts(char_tok, ["12+345=", "7+8=", "99+1="])
    runs = {}
    for name in ("lean", "hf"):
        params = SamplingParams(max_new_tokens=10, num_samples=2, decode_step=name)
        runs[name] = sample(model, ids, mask, params, [3], 0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(runs["lean"].tokens_BT, runs["hf"].tokens_BT)
    assert torch.equal(runs["lean"].mask_BT, runs["hf"].mask_BT)
    torch.testing.assert_close(runs["lean"].logp_BT, runs["hf"].logp_BT, atol=1e-5, rtol=0)


def test_lean_engine_refuses_what_it_cannot_reproduce(char_tok):
    from lit_opd.rollout import lean_step as engine

    model = make_tiny_model(len(char_tok), 32, 2, seed=6).eval()
    model.config.sliding_window, model.config.use_sliding_window = 8, True
    assert not engine.supported(model, 64)  # a window shorter than the sequence changes attention
    ids, mask = _prompts(char_tok, ["1+2="])
    with pytest.raises(ValueError, match="decode_step='lean' does not support"):
        sample(model, ids, mask, SamplingParams(max_new_tokens=10, decode_step="lean"), [3], 0)
    auto = sample(model, ids, mask, SamplingParams(max_new_tokens=3, greedy=True), [3], 0)  # falls back
    assert auto.tokens_BT.shape[0] == 1


def _pair_frequencies(tokens_BT):
    keys, counts = torch.unique(tokens_BT[:, 0] * 1000 + tokens_BT[:, 1], return_counts=True)
    return dict(zip(keys.tolist(), (counts.float() / tokens_BT.shape[0]).tolist()))


def _total_variation(a, b):
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


@pytest.mark.parametrize(
    "settings, peak, same_below, wrong_above",
    [(dict(temperature=0.8, top_k=5), 6, 0.07, 0.1), (dict(temperature=1.3, top_p=0.9), 12, 0.16, 0.25)],
)
def test_sampling_distribution_matches_hf_generate(char_tok, settings, peak, same_below, wrong_above):
    """3000 two-token continuations from each sampler (independent seeds): the empirical
    distributions agree within sampling noise, while a sampler at the wrong temperature does not
    (the negative control shows the check has power). Thresholds sit between the measured noise
    floor of two independent samples and the wrong-temperature distance."""
    model = make_tiny_model(len(char_tok), hidden=32, layers=1, seed=5).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(peak)  # tens to hundreds of likely continuations
    ids, mask = _prompts(char_tok, ["7="])
    n = 3000

    def ours(temperature):
        params = SamplingParams(max_new_tokens=2, num_samples=n, stop_at_eos=False, top_k=settings.get("top_k", 0),
                                top_p=settings.get("top_p", 1.0), temperature=temperature)
        return _pair_frequencies(sample(model, ids, mask, params, [3], 0, generator=torch.Generator().manual_seed(1)).tokens_BT)

    torch.manual_seed(0)
    hf = model.generate(input_ids=ids.repeat(n, 1), attention_mask=mask.repeat(n, 1), do_sample=True,
                        max_new_tokens=2, min_new_tokens=2, pad_token_id=0, top_k=settings.get("top_k", 0),
                        top_p=settings.get("top_p", 1.0), temperature=settings["temperature"])[:, ids.shape[1]:]
    reference = _pair_frequencies(hf)
    assert _total_variation(ours(settings["temperature"]), reference) < same_below
    assert _total_variation(ours(settings["temperature"] + 0.3), reference) > wrong_above


def _lean_greedy(model, ids, mask, steps, **decoder_kwargs):
    """Greedy logits of ``steps`` lean decode steps after a transformers prefill."""
    from lit_opd.rollout.lean_step import LeanDecoder
    from lit_opd.rollout.sampling import returned_cache

    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        decoder = LeanDecoder(model, returned_cache(out), mask, ids.shape[1] + steps, **decoder_kwargs)
        logits, all_logits = out.logits[:, -1], []
        alive = torch.tensor([True, False, True])  # row 1 "finished": later tokens must not see its slots
        for step in range(steps):
            tok = logits.argmax(-1)
            logits = decoder.step(tok, positions[:, -1] + 1 + step, alive).clone()
            all_logits.append(logits)
    return torch.stack(all_logits, 1)


def test_static_shape_step_equals_the_filled_span_step(char_tok):
    """The CUDA-graph form of the step (whole cache under a mask, slot index in a tensor) computes
    what the eager form (filled span only) does, masked rows included."""
    model = make_tiny_model(len(char_tok), 32, 2, seed=6).eval()
    ids, mask = _prompts(char_tok, ["12+345=", "7+8=", "99+1="])
    static = _lean_greedy(model, ids, mask, 6, static_shapes=True)
    span = _lean_greedy(model, ids, mask, 6, static_shapes=False)
    torch.testing.assert_close(static, span, atol=1e-5, rtol=1e-5)


def test_lean_engine_under_autocast_matches_the_model(char_tok):
    """bf16 autocast: the lean step casts the weights once per rollout; same tokens and log-probs
    as the model's own autocast forward."""
    model = make_tiny_model(len(char_tok), 32, 2, seed=6).eval()
    ids, mask = _prompts(char_tok, ["12+345=", "7+8=", "99+1="])
    runs = {}
    for name in ("lean", "hf"):
        params = SamplingParams(max_new_tokens=10, num_samples=2, decode_step=name)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs[name] = sample(model, ids, mask, params, [3], 0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(runs["lean"].tokens_BT, runs["hf"].tokens_BT)
    torch.testing.assert_close(runs["lean"].logp_BT, runs["hf"].logp_BT, atol=2e-2, rtol=0)


def test_checking_for_the_end_every_few_tokens_gives_the_same_output(char_tok, monkeypatch):
    """On an accelerator the loop checks "every row finished?" every few tokens (a host sync) and
    trims what it ran past the last EOS: the output equals checking every token."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from lit_opd.rollout import sampling

    student = Path(__file__).resolve().parents[2] / "lit_opd/assets/addition/student"
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    ids, mask = _prompts(char_tok, ["1+2=", "123+456=", "99+999="])
    params = SamplingParams(max_new_tokens=12, num_samples=2, temperature=0.5)
    runs = []
    for interval in (1, 5):
        monkeypatch.setattr(sampling, "stop_check_interval", lambda device, n=interval: n)
        runs.append(sample(model, ids, mask, params, [3], 0, generator=torch.Generator().manual_seed(0)))
    every, sparse = runs
    assert every.mask_BT.shape[1] < 12  # every row stopped early, at different steps
    for field in ("tokens_BT", "mask_BT", "logp_BT", "truncated_B"):
        assert torch.equal(getattr(every, field), getattr(sparse, field)), field
