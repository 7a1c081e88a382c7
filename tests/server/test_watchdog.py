"""A server of its own with short timeouts: a frozen scheduler or detokenizer is noticed, slow
clients are cut off, the API key comes from the environment, metrics are served, chunked bodies
are bounded.

    --watchdog_timeout 1.5 --header_timeout 1 --enable_metrics --max_request_bytes 1000000
    MINI_SGLANG_API_KEY=env-secret
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

try:                                    # --enable_metrics needs prometheus-client
    import prometheus_client  # noqa: F401
    METRICS = ["--enable_metrics"]
except ImportError:
    METRICS = []

from live_server import assert_no_leak, start_server, wait_idle

pytestmark = pytest.mark.server
KEY = "env-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


def child_pid(parent: int, comm: str) -> int:
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
        except (OSError, ValueError):
            continue
        if d.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == parent and \
                (d / "comm").read_text().strip() == comm:
            return int(d.name)
    raise AssertionError(f"no child {comm} of {parent}")


# Process names as ps shows them (/proc/PID/comm keeps 15 characters).
SCHEDULER, DETOKENIZER = "mini::scheduler", "mini::detokeniz"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    os.environ["MINI_SGLANG_API_KEY"] = KEY
    try:
        handle = start_server(tmp_path_factory.mktemp("watchdog"), "--watchdog_timeout", "1.5", "--header_timeout",
                              "1", *METRICS, "--max_request_bytes", "1000000")
    finally:
        del os.environ["MINI_SGLANG_API_KEY"]
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def c(guarded):
    with httpx.Client(base_url=guarded.url, timeout=30, headers=AUTH) as client:
        yield client


def test_api_key_from_the_environment_not_the_command_line(guarded, c):
    assert httpx.get(guarded.url + "/get_model_info").status_code == 401
    assert c.get("/get_model_info").status_code == 200
    assert KEY.encode() not in Path(f"/proc/{guarded.proc.pid}/cmdline").read_bytes()


def test_trickled_headers_are_cut_off(guarded):
    host, port = guarded.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        t0 = time.monotonic()
        try:
            for ch in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                s.send(bytes([ch]))          # one byte every 0.2 s never completes the headers
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(5)
        try:
            assert s.recv(1024) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < 4


def test_chunked_body_over_limit_is_413(c):
    def chunks():
        for _ in range(20):
            yield b" " * 100_000          # 2 MB in all, with no Content-Length to refuse early
    r = c.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


@pytest.mark.skipif(not METRICS, reason="prometheus-client is not installed")
def test_metrics(c):
    assert c.post("/generate", json={"text": "count me", "sampling_params": {"max_new_tokens": 5}}).status_code == 200
    c.post("/generate", content=b"{", headers={"content-type": "application/json"})
    text = c.get("/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    name = next(k for k in values if k.startswith("sglang:generation_tokens_total"))
    assert values[name] >= 5
    assert any(k.startswith("sglang:time_to_first_token_seconds_count") and v >= 1 for k, v in values.items())
    assert any(k.startswith("sglang:inter_token_latency_seconds_count") and v >= 4 for k, v in values.items())
    assert values['sglang:http_responses_total{code="400",route="/generate"}'] >= 1
    assert 'sglang:num_running_reqs{' in text and "sglang:token_usage{" in text and "sglang:num_retracted_reqs{" in text


@pytest.mark.parametrize("comm, who", [(SCHEDULER, "SCHEDULER"), (DETOKENIZER, "DETOKENIZER")])
def test_frozen_child_is_noticed_and_recovers(guarded, c, comm, who):
    """SIGSTOP the scheduler or the detokenizer: the request in flight ends with 503, /health and
    new requests get 503, /get_server_info 503 (not 500); SIGCONT: serving again, nothing leaked.
    (A frozen detokenizer still lets the scheduler answer probes: its own heartbeat notices.)"""
    pid = child_pid(guarded.proc.pid, comm)
    result = {}
    body = {"text": "x", "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
    t = threading.Thread(target=lambda: result.update(r=c.post("/generate", json=body)))
    t.start()
    time.sleep(0.5)
    os.kill(pid, signal.SIGSTOP)
    try:
        t.join(10)
        assert not t.is_alive() and result["r"].status_code == 503, result
        assert who.lower() in result["r"].json()["error"]["message"]
        assert c.get("/health").status_code == 503
        assert c.post("/generate", json={"text": "hi"}).status_code == 503
        assert c.get("/get_server_info").status_code == 503
        assert f"{who} STALLED" in guarded.log()
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_healthy(c)                           # the next probe's answer clears the stall
    assert c.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}).status_code == 200
    assert_no_leak(wait_idle(c))


def test_frozen_detokenizer_fails_health_while_idle(guarded, c):
    """With nothing in flight no heartbeat runs, so /health pings the detokenizer itself."""
    wait_healthy(c)
    pid = child_pid(guarded.proc.pid, DETOKENIZER)
    os.kill(pid, signal.SIGSTOP)
    try:
        r = c.get("/health")
        assert r.status_code == 503 and "detokenizer did not answer" in r.json()["error"]["message"]
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_healthy(c)


def wait_healthy(c, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while c.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "never recovered"
        time.sleep(0.1)


@pytest.mark.parametrize("comm, who", [(SCHEDULER, "scheduler"), (DETOKENIZER, "detokenizer")])
def test_exit_on_stall(tmp_path, comm, who):
    """--exit_on_scheduler_stall: a frozen scheduler or detokenizer ends the server with exit
    code 1, no orphans."""
    handle = start_server(tmp_path, "--watchdog_timeout", "1", "--exit_on_scheduler_stall")
    pid = child_pid(handle.proc.pid, comm)
    os.kill(pid, signal.SIGSTOP)
    try:
        r = httpx.post(handle.url + "/generate", json={"text": "x"}, timeout=20)
        assert r.status_code == 503                 # the request is failed, then the server goes away
        assert handle.proc.wait(20) == 1
        assert f"the {who} stalled; shutting the server down" in handle.log()
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGCONT)
        handle.stop()


def test_dead_detokenizer_ends_requests_and_exits(tmp_path):
    """A killed detokenizer is the launcher watchdog's case, as a dead scheduler is: the request
    in flight ends with 503, the server exits with code 1 and says which child died."""
    handle = start_server(tmp_path)
    try:
        result = {}
        body = {"text": "x", "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(handle.url + "/generate", json=body,
                                                                        timeout=30)))
        t.start()
        time.sleep(0.5)
        os.kill(child_pid(handle.proc.pid, DETOKENIZER), signal.SIGKILL)
        assert handle.proc.wait(30) == 1
        t.join(10)
        assert not t.is_alive() and result["r"].status_code == 503, result
        assert "the detokenizer process died (exit code -9)" in handle.log()
    finally:
        handle.stop()
