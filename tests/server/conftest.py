"""Fixtures for the server tests: one real server for the whole session.

`server` starts `python -m server.launch_server` on the demo model once (see live_server.py)
and stops it with SIGTERM at the end, checking that it exits cleanly (code 0).
"""
from __future__ import annotations

import sys
from pathlib import Path

# This directory is named `server` too, and pytest puts tests/ on sys.path: without the
# repository root in front, `import server` would find this folder (a namespace package)
# instead of the real one when pytest is run from elsewhere or as a plain `pytest`.
ROOT = str(Path(__file__).resolve().parents[2])
if sys.path[:1] != [ROOT]:
    sys.path.insert(0, ROOT)

import httpx  # noqa: E402
import pytest  # noqa: E402

from live_server import start_server  # noqa: E402


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    # The chat parsers are on as people serve Qwen3; they change nothing for requests without
    # tools or <think> output, which is what the other tests send.
    handle = start_server(tmp_path_factory.mktemp("server"), "--reasoning_parser", "qwen3",
                          "--tool_call_parser", "qwen25")
    yield handle
    rc = handle.stop()
    assert rc == 0, f"server exit code {rc}\n{handle.log()[-3000:]}"


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def tokenizer():
    from stage1_model.model_source import resolve_model_path
    from stage1_model.tokenizer import load_tokenizer
    return load_tokenizer(resolve_model_path("demo"))
