"""The server with --tp 2 on 2 GPUs (NCCL, CUDA graphs; marker gpu, skipped without 2 GPUs).

fp32, so greedy text must be equal: --tp 1 on one GPU, --tp 2 in one launch, and two
"nodes" on one host (two launches with --nnodes 2, one GPU each via CUDA_VISIBLE_DEVICES).
Run: python -m pytest -m gpu tests/stage5/test_tp_gpu.py tests/server/test_tp_server_gpu.py
"""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
import torch

from live_server import ROOT, free_port, start_server

pytestmark = [pytest.mark.server, pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]
GPU = ("--device", "cuda", "--dtype", "float32", "--cuda_graph_max_bs", "16")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "你好，请介绍一下你自己"]


def greedy(url: str) -> list:
    with httpx.Client(base_url=url, timeout=120) as c:
        body = {"text": PROMPTS, "sampling_params": {"temperature": 0, "max_new_tokens": 32}}
        return [o["output_ids"] for o in c.post("/generate", json=body).json()]


def served(tmp_path, *flags, env: dict | None = None) -> list:
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        srv = start_server(tmp_path, *GPU, *flags, timeout=600)
    finally:
        os.environ.clear()
        os.environ.update(old)
    try:
        return greedy(srv.url)
    finally:
        assert srv.stop(60) == 0, srv.log()[-3000:]


def test_tp2_and_two_nodes_equal_tp1(tmp_path):
    want = served(tmp_path)
    assert served(tmp_path, "--tp", "2") == want
    addr = f"127.0.0.1:{free_port()}"
    flags = ["--tp", "2", "--nnodes", "2", "--dist_init_addr", addr]
    env1 = dict(os.environ, CUDA_VISIBLE_DEVICES="1", TOKENIZERS_PARALLELISM="false")
    node1 = subprocess.Popen([sys.executable, "-m", "server.launch_server", "--model", "demo", *GPU,
                              "--max_total_tokens", "2048", "--node_rank", "1", *flags],
                             cwd=ROOT, env=env1, stdout=open(tmp_path / "node1.log", "w"), stderr=subprocess.STDOUT)
    try:
        assert served(tmp_path, "--node_rank", "0", *flags, env={"CUDA_VISIBLE_DEVICES": "0"}) == want
        assert node1.wait(60) == 0, (tmp_path / "node1.log").read_text()[-3000:]   # rank 0 told it to stop
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
