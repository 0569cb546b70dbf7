"""Builders shared by tests (not fixtures, so subprocess scripts can import them too)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


def make_tiny_model(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config)


def save_tiny_model(model, tokenizer, path: str | Path) -> None:  # noqa: ANN001
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def addition_rows(n: int, seed: int = 0) -> list[dict]:
    from lit_opd.tasks import AdditionTask

    return AdditionTask(1, 2).make_rows(n, seed)
