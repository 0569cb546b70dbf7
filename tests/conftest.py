"""Shared fixtures: tiny models built from a config and saved to disk, so every test loads them
through the same transformers code path a user's real model takes. Nothing is downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from tests.helpers import make_tiny_model, save_tiny_model

# Two cores: more than one intra-op thread per process only adds contention in tests.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def char_tok():
    from lit_opd.tasks import char_tokenizer

    return char_tokenizer()


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, char_tok):
    path = tmp_path_factory.mktemp("student")
    save_tiny_model(make_tiny_model(len(char_tok), hidden=32, layers=2, seed=0), char_tok, path)
    return str(path)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, char_tok):
    path = tmp_path_factory.mktemp("teacher")
    save_tiny_model(make_tiny_model(len(char_tok), hidden=48, layers=2, seed=1), char_tok, path)
    return str(path)
