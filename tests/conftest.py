"""Shared fixtures (helpers live in tests/helpers.py): a paired HF/our tiny model per config,
and a tiny HF `save_pretrained` directory for runner/engine/server tests."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without CUDA, Triton kernels can only run in Triton's interpreter. The variable is read when
# a kernel is defined, so it is set here, before any test module imports a kernel file.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny models: one thread is faster than two fighting over a small, busy CPU.
torch.set_num_threads(1)

from helpers import TINY_CONFIGS, make_hf, make_pair  # noqa: E402



@pytest.fixture(params=list(TINY_CONFIGS), scope="module")
def tiny_pair(request):
    cfg = TINY_CONFIGS[request.param]
    hf, ours = make_pair(cfg)
    return cfg, hf, ours


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen3 saved by HF `save_pretrained`, plus the HF model itself."""
    cfg = TINY_CONFIGS["gqa4-untied"]
    hf = make_hf(cfg, seed=11)
    path = tmp_path_factory.mktemp("tiny-qwen3")
    hf.save_pretrained(path)
    return path, hf, cfg
