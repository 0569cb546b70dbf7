"""A lean decode step for Llama-family layouts (Llama, Mistral, Qwen2, Qwen3).

After a normal transformers prefill, each new token goes through the model's own weights with
plain torch ops and a preallocated KV cache: no per-step mask construction, cache objects,
output dataclasses or module dispatch, which dominate a decode step of a small model. On a CUDA
device the step has static shapes (it attends over the whole preallocated cache under a mask and
writes the new key/value at a position held in a tensor), so it is captured once per rollout in a
CUDA graph and replayed per token: one launch instead of ~15 per layer, which bounds the decode
step of a mid-size model on a GPU. Under autocast (bf16-mixed) the weights are cast once per
rollout instead of once per token. Anything it does not recognise (other architectures,
LoRA/quantized/sharded layers, sliding windows shorter than the sequence) falls back to calling
the model (``sampling.sample`` decides). Greedy output is tested token-identical to
``model.generate``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_opd.models import is_dtensor

LAYOUTS = ("llama", "mistral", "qwen2", "qwen3")


def _plain_linear(module: nn.Module) -> bool:
    # LoRA, bitsandbytes and other wrappers change the maths; sharded weights are not whole here.
    return type(module) is nn.Linear and not is_dtensor(module.weight)


def supported(model: nn.Module, total_len: int) -> bool:
    """True when :class:`LeanDecoder` reproduces ``model``'s forward for sequences of ``total_len``."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in LAYOUTS:
        return False
    if getattr(config, "hidden_act", "silu") != "silu" or not hasattr(model, "get_decoder"):
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and total_len > window:
        return False
    decoder = model.get_decoder()
    linears = [m for layer in decoder.layers for m in (*_attn_linears(layer), *_mlp_linears(layer))]
    return all(_plain_linear(m) for m in [*linears, model.get_output_embeddings()])


def _attn_linears(layer: nn.Module) -> tuple[nn.Module, ...]:
    a = layer.self_attn
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj


def _mlp_linears(layer: nn.Module) -> tuple[nn.Module, ...]:
    return layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj


def _rms(x: Tensor, norm: nn.Module) -> Tensor:
    """transformers' RMSNorm: normalise in fp32, scale in the input dtype."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * normed.to(x.dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LeanDecoder:
    """Holds a preallocated KV cache and attention mask and runs one token per row per :meth:`step`.

    ``cuda_graph``: capture the step in a CUDA graph on its first call and replay it after (CUDA
    only). ``static_shapes`` (default: as the graph) attends over the whole cache under the mask;
    off, the step attends over the filled part only, which is cheaper when it runs eagerly.
    """

    def __init__(
        self, model: nn.Module, prefill_cache, prompt_mask_BP: Tensor, total_len: int,  # noqa: ANN001
        cuda_graph: bool = True, static_shapes: bool | None = None,
    ) -> None:
        self.model, self.decoder = model, model.get_decoder()
        first = self.decoder.layers[0].self_attn
        self.head_dim, self.scale = first.head_dim, first.scaling
        self.keys, self.values = [], []
        for layer_cache in prefill_cache.layers:
            k, v = layer_cache.keys, layer_cache.values
            B, H_kv, P, D = k.shape
            self.keys.append(k.new_zeros(B, H_kv, total_len, D))
            self.values.append(v.new_zeros(B, H_kv, total_len, D))
            self.keys[-1][:, :, :P], self.values[-1][:, :, :P] = k, v
        device = self.keys[0].device
        self.mask_BL = torch.zeros(B, total_len, dtype=torch.bool, device=device)
        self.mask_BL[:, :P] = prompt_mask_BP.bool()
        self.length, self.total_len = P, total_len
        self.position_1 = torch.tensor([P], device=device)  # the cache slot the next token writes
        self.weights = _step_weights(model, self.decoder, _autocast_dtype(device))
        self.graphed = cuda_graph and device.type == "cuda"
        self.static_shapes = self.graphed if static_shapes is None else static_shapes or self.graphed
        self._graph: torch.cuda.CUDAGraph | None = None

    def step(self, tokens_B: Tensor, positions_B: Tensor, attend_B: Tensor) -> Tensor:
        """Logits (B, V) for the next token after ``tokens_B`` at ``positions_B``. ``attend_B``:
        whether later tokens attend to this one (False for rows that already finished). Under a
        CUDA graph the returned tensor is a buffer that the next call overwrites."""
        if self.length >= self.total_len:
            raise RuntimeError(f"LeanDecoder: the cache holds {self.total_len} positions and is full")
        if not self.graphed:
            span = self.total_len if self.static_shapes else self.length + 1
            logits_BV = self._forward(tokens_B, positions_B, attend_B, span=span)
        else:
            if self._graph is None:
                self._capture(tokens_B, positions_B, attend_B)
            for buffer, value in zip(self._inputs, (tokens_B, positions_B, attend_B)):
                buffer.copy_(value)
            self._graph.replay()
            logits_BV = self._logits_BV
        self.length += 1
        return logits_BV

    def _capture(self, tokens_B: Tensor, positions_B: Tensor, attend_B: Tensor) -> None:
        """Record one step into a CUDA graph. Warm-up steps (on a side stream, as capture needs)
        write the cache and mask at this slot and the next; both are rewound, so the first replay
        computes exactly what an eager step would."""
        self._inputs = (tokens_B.clone(), positions_B.clone(), attend_B.clone())
        start = self.length
        stream = torch.cuda.Stream(self.mask_BL.device)
        stream.wait_stream(torch.cuda.current_stream(self.mask_BL.device))
        with torch.cuda.stream(stream):
            for _ in range(min(2, self.total_len - start)):
                self._forward(*self._inputs, span=self.total_len)
        torch.cuda.current_stream(self.mask_BL.device).wait_stream(stream)
        self.position_1.fill_(start)
        self.mask_BL[:, start:] = False
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits_BV = self._forward(*self._inputs, span=self.total_len)

    def _forward(self, tokens_B: Tensor, positions_B: Tensor, attend_B: Tensor, span: int) -> Tensor:
        """One token through the model; attends over cache slots [0, span) under the mask."""
        self.mask_BL.index_copy_(1, self.position_1, attend_B[:, None])
        h_B1H = self.decoder.embed_tokens(tokens_B[:, None])
        cos, sin = self.decoder.rotary_emb(h_B1H, positions_B[:, None])
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, D): broadcast over heads
        attend_B11L = self.mask_BL[:, None, None, :span]
        for i, (layer, w) in enumerate(zip(self.decoder.layers, self.weights["layers"])):
            x = _rms(h_B1H, layer.input_layernorm)
            h_B1H = h_B1H + self._attention(layer, w, x, i, span, cos, sin, attend_B11L)
            x = _rms(h_B1H, layer.post_attention_layernorm)
            h_B1H = h_B1H + F.linear(F.silu(F.linear(x, *w["gate"])) * F.linear(x, *w["up"]), *w["down"])
        self.position_1.add_(1)
        h_B1H = _rms(h_B1H, self.decoder.norm)
        return F.linear(h_B1H, *self.weights["head"])[:, 0]

    def _attention(self, layer, w, x_B1H, i, span, cos, sin, attend_B11L) -> Tensor:  # noqa: ANN001
        attn = layer.self_attn
        B = x_B1H.shape[0]
        q = F.linear(x_B1H, *w["q"]).view(B, 1, -1, self.head_dim)
        k = F.linear(x_B1H, *w["k"]).view(B, 1, -1, self.head_dim)
        v = F.linear(x_B1H, *w["v"]).view(B, 1, -1, self.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises each head
            q, k = _rms(q, attn.q_norm), _rms(k, attn.k_norm)
        q, k = _rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin)
        self.keys[i].index_copy_(2, self.position_1, k.to(self.keys[i].dtype))
        self.values[i].index_copy_(2, self.position_1, v.to(self.values[i].dtype))
        out = F.scaled_dot_product_attention(
            q, self.keys[i][:, :, :span], self.values[i][:, :, :span],
            attn_mask=attend_B11L, scale=self.scale, enable_gqa=q.shape[1] != k.shape[1],
        )
        return F.linear(out.transpose(1, 2).reshape(B, 1, -1), *w["o"])


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on ``device`` now, or None when it is off."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _step_weights(model: nn.Module, decoder: nn.Module, cast: torch.dtype | None) -> dict:
    """(weight, bias) of every linear of the step, cast once to autocast's dtype when it is on:
    autocast would otherwise cast each weight again at every token, and casting an already cast
    weight is a no-op, so the numbers are those of the model's own autocast forward."""

    def pair(module: nn.Linear) -> tuple[Tensor, Tensor | None]:
        weight, bias = module.weight, module.bias
        if cast is not None:
            weight = weight.detach().to(cast)
            bias = None if bias is None else bias.detach().to(cast)
        return weight, bias

    names = ("q", "k", "v", "o", "gate", "up", "down")  # the order of _attn_linears + _mlp_linears
    layers = [dict(zip(names, map(pair, (*_attn_linears(layer), *_mlp_linears(layer)))))
              for layer in decoder.layers]
    return {"layers": layers, "head": pair(model.get_output_embeddings())}
