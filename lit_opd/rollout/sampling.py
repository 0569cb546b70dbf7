"""Pure generation functions: ``sample(model, ids, mask, params) -> tokens, log-probs``.

They know nothing of tokenization or Lightning, so the rollout DataModule and any method that
needs extra samples mid-step (e.g. chunk rollouts) call the same code.

The decode loop keeps a KV cache and passes explicit position ids, so a left-padded row gets the
same positions as the unpadded prompt would, and rows stop independently at their first EOS.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_opd.errors import NonFiniteError, SettingError
from lit_opd.rollout import lean_step
from lit_opd.rollout.lean_step import LeanDecoder
from lit_opd.types import SamplingParams

STOP_CHECK_EVERY = 8  # tokens between "every row finished?" checks on an accelerator


@dataclass
class SampleOutput:
    """tokens_BT right padded with ``pad_id``; mask_BT True on generated tokens (EOS included);
    logp_BT the sampling distribution's log-prob of each token (0 on padding); truncated_B rows
    that hit the length limit without EOS."""

    tokens_BT: Tensor
    mask_BT: Tensor
    logp_BT: Tensor
    truncated_B: Tensor


def filter_logits(logits_BV: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, then top-k, then top-p; removed entries become -inf."""
    logits_BV = logits_BV.float() / params.temperature
    vocab = logits_BV.shape[-1]
    if 0 < params.top_k < vocab:
        kth_BV = torch.topk(logits_BV, params.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_BV, float("-inf"))
    if params.top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted_BV = (cum_BV - sorted_BV.softmax(-1)) >= params.top_p
        drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def pick_tokens(
    logits_BV: Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One decoding step: the chosen token per row and its log-prob under the sampling distribution."""
    if params.greedy:
        logp_BV = logits_BV.float().log_softmax(-1)
        tokens_B = logp_BV.argmax(-1)
    else:
        logp_BV = filter_logits(logits_BV, params).log_softmax(-1)
        try:
            tokens_B = torch.multinomial(logp_BV.exp(), 1, generator=generator).squeeze(-1)
        except RuntimeError:
            # multinomial checks its input (a host sync it pays anyway); only when it refuses do we
            # look at why, so the usual path costs nothing extra.
            bad_rows = int(nonfinite_rows(logits_BV).sum())
            if not bad_rows:
                raise
            raise nonfinite_logits(bad_rows, logits_BV.shape[0], params) from None
    return tokens_B, logp_BV.gather(-1, tokens_B[:, None]).squeeze(-1)


def nonfinite_rows(logits_BV: Tensor) -> Tensor:
    """Rows with a NaN or +inf logit, or with every logit -inf (a single -inf is a legal mask): (B,)."""
    return (torch.isnan(logits_BV) | torch.isposinf(logits_BV)).any(-1) | torch.isneginf(logits_BV).all(-1)


def nonfinite_logits(bad_rows: int, rows: int, params: SamplingParams) -> NonFiniteError:
    """The error for NaN/inf next-token logits, naming what usually causes them."""
    return NonFiniteError(
        f"the model being sampled from (the student, for on-policy rollouts) returned NaN/inf logits for "
        f"{bad_rows} of {rows} rows, so no token can be drawn: its weights or activations "
        "overflowed.",
        suspects=f"the learning rate (the usual cause: the last update blew up the weights), sampling "
                 f"temperature={params.temperature:g}, fp16 precision (use bf16-mixed or 32-true)",
    )


def cache_kwarg(model: nn.Module) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; accept both generations."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):  # noqa: ANN001, ANN201 - a transformers ModelOutput and its Cache
    return out["cache"] if "cache" in out else out["past_key_values"]


def stop_check_interval(device: torch.device) -> int:
    """Tokens between "every row finished?" checks: each is a host sync, free on a CPU."""
    return 1 if device.type == "cpu" else STOP_CHECK_EVERY


def lean_decoder(
    model: nn.Module, cache, prompt_mask_BP: Tensor, total_len: int, params: SamplingParams  # noqa: ANN001
) -> LeanDecoder | None:
    """The lean decode step when ``params.decode_step`` allows it and the model is a supported layout."""
    decode_step = params.decode_step
    if decode_step == "hf":
        return None
    ok = lean_step.supported(model, total_len) and hasattr(cache, "layers")
    if not ok:
        if decode_step == "lean":
            raise SettingError(
                f"SamplingParams.decode_step='lean' does not support {type(model).__name__} here (supported: plain "
                f"Linear {', '.join(lean_step.LAYOUTS)} layouts); use decode_step 'auto' or 'hf'"
            )
        return None
    return LeanDecoder(model, cache, prompt_mask_BP, total_len, cuda_graph=params.cuda_graph)


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_ids_BP: Tensor,
    prompt_mask_BP: Tensor,
    params: SamplingParams,
    eos_token_ids: list[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
    all_ranks_done: Callable[[bool], bool] | None = None,
) -> SampleOutput:
    """Complete every prompt ``params.num_samples`` times with a KV-cached decode loop.

    Rows of one prompt are adjacent in the output (prompt i → rows i*G .. i*G+G-1).
    ``all_ranks_done`` turns this rank's "every row finished" into the decision of all ranks; a
    sharded student (FSDP) needs it, because every rank must run the same number of forwards.
    The model must be a transformers-style causal LM (``input_ids``, ``attention_mask``,
    ``position_ids``, ``cache`` (or ``past_key_values``), ``use_cache`` → ``.logits`` and the cache).
    """
    ids_BP = prompt_ids_BP.repeat_interleave(params.num_samples, dim=0)
    mask_BL = prompt_mask_BP.repeat_interleave(params.num_samples, dim=0).long()
    positions_BP = (mask_BL.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids_BP, attention_mask=mask_BL, position_ids=positions_BP, use_cache=True)
    logits_BV = out.logits[:, -1, :]
    total_len = ids_BP.shape[1] + params.max_new_tokens
    stepper = lean_decoder(model, returned_cache(out), mask_BL, total_len, params)
    if stepper is None:
        stepper = _ModelStep(model, returned_cache(out), mask_BL)
    del out  # the lean decoder copied the prefill cache into its own buffers; _ModelStep holds it
    eos_ids = torch.tensor(eos_token_ids, device=ids_BP.device)
    loop = _DecodeLoop(params, eos_ids, pad_token_id, generator, all_ranks_done)
    return loop.run(stepper, logits_BV, positions_BP[:, -1] + 1)


class _ModelStep:
    """One decode step through the model's own forward and KV cache (layouts the lean step lacks)."""

    def __init__(self, model: nn.Module, cache, mask_BL: Tensor) -> None:  # noqa: ANN001 - any HF cache
        self.model, self.cache, self.mask_BL, self.cache_arg = model, cache, mask_BL, cache_kwarg(model)

    def step(self, tok_B: Tensor, pos_B: Tensor, alive_B: Tensor) -> Tensor:
        self.mask_BL = torch.cat([self.mask_BL, alive_B.long()[:, None]], dim=1)
        out = self.model(input_ids=tok_B[:, None], attention_mask=self.mask_BL, position_ids=pos_B[:, None],
                         use_cache=True, **{self.cache_arg: self.cache})
        self.cache = returned_cache(out)
        return out.logits[:, -1, :]


class _DecodeLoop:
    """Draw a token per row and step the model until every row has stopped or the limit is hit."""

    def __init__(self, params: SamplingParams, eos_ids: Tensor, pad_token_id: int,
                 generator: torch.Generator | None, all_ranks_done: Callable[[bool], bool] | None) -> None:
        self.params, self.eos_ids, self.pad_token_id = params, eos_ids, pad_token_id
        self.generator, self.all_ranks_done = generator, all_ranks_done
        # "Every row finished?" is a host sync. On an accelerator a sync per token idles the device
        # while Python queues the next step, so the loop asks every few tokens and trims the
        # pad-only columns it ran past the last EOS; the output is the same as asking every token.
        self.check_every = stop_check_interval(eos_ids.device)

    def run(self, stepper, logits_BV: Tensor, pos_B: Tensor) -> SampleOutput:  # noqa: ANN001 - has .step
        params = self.params
        finished_B = torch.zeros(logits_BV.shape[0], dtype=torch.bool, device=logits_BV.device)
        tokens, logps, valid = [], [], []
        for step in range(params.max_new_tokens):
            tok_B, logp_B = pick_tokens(logits_BV, params, self.generator)
            tok_B = tok_B.masked_fill(finished_B, self.pad_token_id)
            tokens.append(tok_B)
            logps.append(logp_B.masked_fill(finished_B, 0.0))
            valid.append(~finished_B)
            if params.stop_at_eos:
                finished_B = finished_B | torch.isin(tok_B, self.eos_ids)
            done = self._all_done(step, finished_B)  # a collective under FSDP: every rank calls it alike
            if step == params.max_new_tokens - 1 or done:
                break
            logits_BV = stepper.step(tok_B, pos_B, ~finished_B)  # the lean step keeps its own mask
            pos_B = pos_B + 1
        return self._output(tokens, logps, valid, finished_B)

    def _all_done(self, step: int, finished_B: Tensor) -> bool:
        if not self.params.stop_at_eos or (step + 1) % self.check_every != 0:
            return False
        done = bool(finished_B.all())
        return self.all_ranks_done(done) if self.all_ranks_done is not None else done

    def _output(self, tokens: list, logps: list, valid: list, finished_B: Tensor) -> SampleOutput:
        mask_BT = torch.stack(valid, dim=1)
        keep = int(mask_BT.any(0).nonzero().max()) + 1 if self.check_every > 1 else mask_BT.shape[1]
        return SampleOutput(
            tokens_BT=torch.stack(tokens, dim=1)[:, :keep],
            mask_BT=mask_BT[:, :keep],
            logp_BT=torch.stack(logps, dim=1)[:, :keep],
            truncated_B=~finished_B if self.params.stop_at_eos else torch.ones_like(finished_B),
        )
