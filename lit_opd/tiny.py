"""Tiny randomly initialised causal LMs built from a config (no download), for tests, benchmarks
and trying a setting in seconds. They are ordinary transformers models (Qwen3 layout), so every
code path a user's real model takes — loading, the lean decode step, the lean loss — runs on them."""

from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


def make_tiny_model(
    vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, max_positions: int = 128
) -> Qwen3ForCausalLM:
    """A Qwen3-layout model with ``layers`` decoder layers of width ``hidden`` (4 query, 2 KV heads);
    pad/BOS/EOS ids 0/2/3 as in :func:`lit_opd.tasks.char_tokenizer`; weights seeded by ``seed``."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config)
