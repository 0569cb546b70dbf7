"""A lean decode step for Llama-family layouts (Llama, Mistral, Qwen2, Qwen3).

After a normal transformers prefill, each new token goes through the model's own weights with
plain torch ops and a preallocated KV cache: no per-step mask construction, cache objects,
output dataclasses or module dispatch, which dominate a decode step of a small model. Anything
it does not recognise (other architectures, LoRA/quantized/sharded layers, sliding windows
shorter than the sequence) falls back to calling the model (``sampling.sample`` decides).
Greedy output is tested token-identical to ``model.generate``.
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


def _linear(x: Tensor, module: nn.Linear) -> Tensor:
    return F.linear(x, module.weight, module.bias)  # skips nn.Module call overhead


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LeanDecoder:
    """Holds a preallocated KV cache and runs one token per row per :meth:`step`."""

    def __init__(self, model: nn.Module, prefill_cache, total_len: int) -> None:  # noqa: ANN001
        self.model, self.decoder = model, model.get_decoder()
        first = self.decoder.layers[0].self_attn
        self.head_dim, self.scale = first.head_dim, first.scaling
        self.keys, self.values = [], []
        for layer_cache in prefill_cache.layers:
            k = layer_cache.keys
            B, H_kv, P, D = k.shape
            buf_k = k.new_zeros(B, H_kv, total_len, D)
            buf_v = k.new_zeros(B, H_kv, total_len, D)
            buf_k[:, :, :P], buf_v[:, :, :P] = k, layer_cache.values
            self.keys.append(buf_k)
            self.values.append(buf_v)
        self.length = P

    def step(self, tokens_B: Tensor, positions_B: Tensor, mask_BL: Tensor) -> Tensor:
        """Logits (B, V) for the next token after ``tokens_B`` at ``positions_B``; ``mask_BL`` is
        the attention mask over the cache including this token (B, length + 1)."""
        h_B1H = self.decoder.embed_tokens(tokens_B[:, None])
        cos, sin = self.decoder.rotary_emb(h_B1H, positions_B[:, None])
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, D): broadcast over heads
        t = self.length
        attend_B11L = mask_BL[:, None, None, : t + 1].bool()
        for i, layer in enumerate(self.decoder.layers):
            h_B1H = h_B1H + self._attention(layer, _rms(h_B1H, layer.input_layernorm), i, t, cos, sin, attend_B11L)
            x = _rms(h_B1H, layer.post_attention_layernorm)
            mlp = layer.mlp
            h_B1H = h_B1H + _linear(F.silu(_linear(x, mlp.gate_proj)) * _linear(x, mlp.up_proj), mlp.down_proj)
        self.length = t + 1
        h_B1H = _rms(h_B1H, self.decoder.norm)
        return _linear(h_B1H, self.model.get_output_embeddings())[:, 0]

    def _attention(self, layer, x_B1H, i, t, cos, sin, attend_B11L) -> Tensor:  # noqa: ANN001
        attn = layer.self_attn
        B = x_B1H.shape[0]
        q = _linear(x_B1H, attn.q_proj).view(B, 1, -1, self.head_dim)
        k = _linear(x_B1H, attn.k_proj).view(B, 1, -1, self.head_dim)
        v = _linear(x_B1H, attn.v_proj).view(B, 1, -1, self.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises each head
            q, k = _rms(q, attn.q_norm), _rms(k, attn.k_norm)
        q, k = _rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin)
        self.keys[i][:, :, t : t + 1] = k
        self.values[i][:, :, t : t + 1] = v
        out = F.scaled_dot_product_attention(
            q, self.keys[i][:, :, : t + 1], self.values[i][:, :, : t + 1],
            attn_mask=attend_B11L, scale=self.scale, enable_gqa=q.shape[1] != k.shape[1],
        )
        return _linear(out.transpose(1, 2).reshape(B, 1, -1), attn.o_proj)
