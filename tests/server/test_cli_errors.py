"""Bad start-up flags end `python -m server.launch_server` at once: exit code 2, one line on
stderr saying what to do, no traceback, and no process spawned or weight read (each case
exits in about the time Python takes to import torch)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]


def launch(*flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "server.launch_server", *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


def no_weights_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


CASES = {   # id: (flags, words the one line must contain)
    "dir without config.json": (lambda tmp: ["--model", str(tmp)], "no config.json"),
    "a file, not a directory": (lambda tmp: ["--model", str(ROOT / "pyproject.toml")], "a file"),
    "no weights, no dummy": (lambda tmp: ["--model", str(no_weights_dir(tmp))], "--load_format dummy"),
    "a path that does not exist": (lambda tmp: ["--model", str(tmp / "nope")], "no such directory"),
    "fa3 on cpu": (lambda tmp: ["--device", "cpu", "--attention_backend", "fa3"], "only the torch backend"),
    "fa on cpu": (lambda tmp: ["--device", "cpu", "--attention_backend", "fa"], "only the torch backend"),
    "triton on cpu": (lambda tmp: ["--device", "cpu", "--attention_backend", "triton"], "only the torch backend"),
    "tp not a multiple of nnodes": (lambda tmp: ["--device", "cpu", "--tp", "3", "--nnodes", "2",
                                                 "--dist_init_addr", "127.0.0.1:5000"], "positive multiple"),
    "nnodes without an address": (lambda tmp: ["--device", "cpu", "--tp", "2", "--nnodes", "2"], "--dist_init_addr"),
    "node_rank out of range": (lambda tmp: ["--device", "cpu", "--tp", "2", "--nnodes", "2", "--node_rank", "2",
                                            "--dist_init_addr", "127.0.0.1:5000"], "--node_rank 2"),
    "bad dist_init_addr": (lambda tmp: ["--device", "cpu", "--tp", "2", "--dist_init_addr", "localhost"], "HOST:PORT"),
    "cuda graph bs 0": (lambda tmp: ["--device", "cpu", "--cuda_graph_max_bs", "0"], "at least 1"),
    "port out of range": (lambda tmp: ["--device", "cpu", "--port", "70000"], "--port must be in"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_flags_fail_fast_with_one_line(case, tmp_path):
    make_flags, words = CASES[case]
    start = time.monotonic()
    out = launch(*make_flags(tmp_path))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("mini-sglang serve: error:"), out.stderr
    assert time.monotonic() - start < 15        # ~1.5 s (importing torch); loose for a busy CI machine


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_says_use_cpu():
    out = launch("--device", "cuda")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "mini-sglang serve: error: --device cuda: no CUDA device is visible here; use --device cpu"], out.stderr
