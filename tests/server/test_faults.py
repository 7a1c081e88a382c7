"""Faults: clients that vanish, control routes while busy, concurrency, API keys, crashes.

Disconnects must abort within about one scheduler step and return every KV slot; a dead
child process must take the server down with exit code 1 and a clear log line, not hang.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from live_server import assert_no_leak, start_server, wait_idle

pytestmark = pytest.mark.server
LONG = {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 0}


def wait_running(client, n: int = 1, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/get_server_info").json()["internal_states"][0]["num_running"] < n:
        assert time.monotonic() < deadline, "request never started running"
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_every_slot(client, server):
    body = {"text": "a long story", "sampling_params": LONG, "stream": True, "rid": "gone-stream"}
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/generate", json=body) as r:
        events = []
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
            if len(events) == 3:
                break                                  # leave mid-stream: the connection closes
    t0 = time.monotonic()
    state = wait_idle(client)
    assert time.monotonic() - t0 < 5
    assert_no_leak(state)
    assert "request gone-stream aborted (client gone)" in server.log()


def test_disconnect_non_stream_aborts(client, server):
    body = {"text": "another long story", "sampling_params": LONG, "rid": "gone-plain"}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/generate", json=body, timeout=httpx.Timeout(60, read=1.5))
    assert_no_leak(wait_idle(client))
    assert "request gone-plain aborted (client gone)" in server.log()


def test_flush_refused_while_running_then_abort_request(client, server):
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(
        server.url + "/generate", json={"text": "busy", "sampling_params": LONG, "rid": "busy-1"}, timeout=120)))
    t.start()
    wait_running(client)
    r = client.post("/flush_cache")
    assert r.status_code == 400 and "running" in r.json()["error"]["message"]
    assert client.post("/abort_request", json={"rid": "busy-1"}).json() == {"aborted": ["busy-1"]}
    t.join(30)
    out = result["r"].json()
    assert result["r"].status_code == 200 and out["meta_info"]["finish_reason"]["type"] == "abort"
    assert out["meta_info"]["completion_tokens"] < LONG["max_new_tokens"]
    assert_no_leak(wait_idle(client))
    assert client.post("/flush_cache").status_code == 200


def test_concurrent_mixed_requests(server, client):
    async def one(c, i):
        body = {"text": f"request number {i}", "sampling_params": {"max_new_tokens": 8 + i, "ignore_eos": True, "temperature": 0},
                "stream": i % 2 == 0}
        r = await c.post("/generate", json=body)
        assert r.status_code == 200
        last = json.loads(r.text.split("\n\n")[-3][6:]) if body["stream"] else r.json()
        return last["meta_info"]["completion_tokens"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(*[one(c, i) for i in range(12)])

    assert asyncio.run(main()) == [8 + i for i in range(12)]
    assert_no_leak(wait_idle(client))


def child_pid(server, name: str) -> int:
    for pid in Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split():
        if Path(f"/proc/{pid}/comm").read_text().strip() == f"mini::{name}"[:15]:
            return int(pid)
    raise AssertionError(f"no {name} child")


@pytest.mark.skipif(not Path("/proc/self/comm").exists(), reason="needs Linux /proc")
def test_api_key_then_scheduler_crash_exits_nonzero(tmp_path):
    srv = start_server(tmp_path, "--api_key", "s3cret")
    try:
        body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}
        assert httpx.get(srv.url + "/health").status_code == 200                 # the one open route
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(srv.url + "/generate", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == 401
        for path in ("/health_generate", "/health/", "/get_server_info", "/v1/models"):
            assert httpx.get(srv.url + path).status_code == 401, path
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.post(srv.url + "/generate", json=body, headers=auth, timeout=60).status_code == 200
        # A stream in flight when the scheduler dies must end (error event + [DONE]), not hang.
        events, opened = [], threading.Event()

        def stream():
            body = {"text": "x", "stream": True, "sampling_params": LONG}
            with httpx.stream("POST", srv.url + "/generate", json=body, headers=auth, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        opened.set()
        t = threading.Thread(target=stream)
        t.start()
        assert opened.wait(30)
        os.kill(child_pid(srv, "scheduler"), signal.SIGKILL)
        assert srv.proc.wait(30) == 1
        t.join(10)
        assert not t.is_alive() and events[-1] == "[DONE]" and '"code": 503' in events[-2]
        assert "the scheduler process died (exit code -9)" in srv.log()
    finally:
        srv.stop()


def test_big_prompt_does_not_block_other_clients(server):
    """A prompt just under the character limit is tokenized in a worker thread, so /health
    stays fast; 2 MB of text is refused (413) before any tokenizing."""
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            assert (await c.post("/generate", json={"text": "hello world, a long text. " * 80000})).status_code == 413
            big = asyncio.ensure_future(c.post("/generate", json={"text": "hello world, a long text. " * 3000}))
            worst = 0.0
            while not big.done():
                t0 = time.perf_counter()
                assert (await c.get("/health")).status_code == 200
                worst = max(worst, time.perf_counter() - t0)
                await asyncio.sleep(0.02)
            return (await big), worst

    r, worst = asyncio.run(main())
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    assert worst < 1.0, f"/health took {worst:.2f} s while a big prompt was tokenized"


@pytest.mark.parametrize("error, status", [(KeyError("boom"), 500), ("bad", 400), ("failed", 503)])
def test_errors_after_headers_go_inside_the_stream(error, status):
    """Once SSE headers are out, any error (a bug included) becomes an error event + [DONE]."""
    from server.entrypoints.http_utils import sse_stream
    from server.managers.tokenizer_manager import RequestFailed
    from server.validation import BadRequest
    exc = {"bad": BadRequest("bad input"), "failed": RequestFailed("shutting down", 503)}.get(error, error)

    async def events():
        yield {"text": "a"}
        raise exc

    async def collect():
        return [e async for e in sse_stream(events())]
    chunks = asyncio.run(collect())
    assert json.loads(chunks[0][len("data: "):]) == {"text": "a"}
    assert json.loads(chunks[1][len("data: "):])["error"]["code"] == status
    assert chunks[2] == "data: [DONE]\n\n" and len(chunks) == 3
