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

from lit_opd.rollout import engine as engine_mod
from lit_opd.rollout.engine import LeanDecoder
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
        tokens_B = torch.multinomial(logp_BV.exp(), 1, generator=generator).squeeze(-1)
    return tokens_B, logp_BV.gather(-1, tokens_B[:, None]).squeeze(-1)


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
    """The lean decode step when ``params.engine`` allows it and the model is a supported layout."""
    engine = params.engine
    if engine == "hf":
        return None
    ok = engine_mod.supported(model, total_len) and hasattr(cache, "layers")
    if not ok:
        if engine == "lean":
            raise ValueError(
                f"SamplingParams.engine='lean' does not support {type(model).__name__} here (supported: plain "
                f"Linear {', '.join(engine_mod.LAYOUTS)} layouts); use engine 'auto' or 'hf'"
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
    eos_ids = torch.tensor(eos_token_ids, device=ids_BP.device)
    out = model(input_ids=ids_BP, attention_mask=mask_BL, position_ids=positions_BP, use_cache=True)
    logits_BV = out.logits[:, -1, :]
    decoder = lean_decoder(model, returned_cache(out), mask_BL, ids_BP.shape[1] + params.max_new_tokens, params)
    if decoder is not None:
        del out  # the decoder copied the prefill cache into its own buffers
    else:
        cache_arg = cache_kwarg(model)
    next_pos_B1 = positions_BP[:, -1:] + 1
    finished_B = torch.zeros(ids_BP.shape[0], dtype=torch.bool, device=ids_BP.device)
    tokens, logps, valid = [], [], []
    # "Every row finished?" is a host sync. On an accelerator a sync per token idles the device
    # while Python queues the next step, so the loop asks every few tokens and trims the pad-only
    # columns it ran past the last EOS; the output is the same as asking every token.
    check_every = stop_check_interval(ids_BP.device)
    for step in range(params.max_new_tokens):
        tok_B, logp_B = pick_tokens(logits_BV, params, generator)
        tok_B = tok_B.masked_fill(finished_B, pad_token_id)
        tokens.append(tok_B)
        logps.append(logp_B.masked_fill(finished_B, 0.0))
        valid.append(~finished_B)
        done = False
        if params.stop_at_eos:
            finished_B = finished_B | torch.isin(tok_B, eos_ids)
            if (step + 1) % check_every == 0:
                done = bool(finished_B.all())
                if all_ranks_done is not None:
                    done = all_ranks_done(done)
        if step == params.max_new_tokens - 1 or done:
            break
        if decoder is not None:  # it keeps its own attention mask
            logits_BV = decoder.step(tok_B, next_pos_B1[:, 0], ~finished_B)
        else:
            mask_BL = torch.cat([mask_BL, (~finished_B).long()[:, None]], dim=1)
            out = model(
                input_ids=tok_B[:, None],
                attention_mask=mask_BL,
                position_ids=next_pos_B1,
                use_cache=True,
                **{cache_arg: returned_cache(out)},
            )
            logits_BV = out.logits[:, -1, :]
        next_pos_B1 = next_pos_B1 + 1
    mask_BT = torch.stack(valid, dim=1)
    keep = int(mask_BT.any(0).nonzero().max()) + 1 if check_every > 1 else mask_BT.shape[1]
    return SampleOutput(
        tokens_BT=torch.stack(tokens, dim=1)[:, :keep],
        mask_BT=mask_BT[:, :keep],
        logp_BT=torch.stack(logps, dim=1)[:, :keep],
        truncated_B=~finished_B if params.stop_at_eos else torch.ones_like(finished_B),
    )
