"""The server with --tp 2 on CPU (gloo): one scheduler process per rank.

Checked against the session's --tp 1 server (same flags otherwise): the same greedy text
from /generate and /v1/chat/completions; an abort and a client disconnect free the KV
slots on *every* rank (/get_server_info's internal_states[0]["tp_ranks"] lists each rank's
books); two launches with --nnodes 2 (node 0 serves HTTP, node 1 only runs rank 1) form
one server with the same text; killing a rank's process ends the server (exit code 1, a
log line naming it) and, with two nodes, both launchers, leaving no process behind.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from live_server import POOL_TOKENS, ROOT, free_port, start_server, wait_idle

pytestmark = [pytest.mark.server, pytest.mark.skipif(not Path("/proc/self/comm").exists(), reason="needs /proc")]
SAME_AS_SESSION = ("--reasoning_parser", "qwen3", "--tool_call_parser", "qwen25")   # tests/server/conftest.py
PROMPTS = ["The capital of France is", "你好，请介绍一下你自己"]
GREEDY = {"temperature": 0, "max_new_tokens": 16}
LONG = {"temperature": 0, "max_new_tokens": 1500, "ignore_eos": True}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Tell me a joke."}], "temperature": 0,
        "max_tokens": 16}


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory):
    handle = start_server(tmp_path_factory.mktemp("tp-server"), "--tp", "2", *SAME_AS_SESSION)
    yield handle
    handle.stop()


def answers(url: str) -> list:
    with httpx.Client(base_url=url, timeout=60) as c:
        out = [c.post("/generate", json={"text": p, "sampling_params": GREEDY}).json() for p in PROMPTS]
        chat = c.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]
    return [(o["text"], o["output_ids"]) for o in out] + [(chat.get("content"), chat.get("reasoning_content"))]


def descendants(pid: int) -> list[int]:
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []
    return kids + [d for k in kids for d in descendants(k)]


def child_pid(parent: int, comm: str) -> int:
    for pid in descendants(parent):
        if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
            return pid
    raise AssertionError(f"no {comm} under {parent}")


def assert_gone(pids: list[int], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if Path(f"/proc/{p}").exists()
                 and "zombie" not in Path(f"/proc/{p}/status").read_text()]
    assert not alive, f"processes left behind: {alive}"


def assert_every_rank_idle(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        ranks = wait_idle(c)["tp_ranks"]
    assert len(ranks) == 2 and ranks[0] == ranks[1], ranks
    for s in ranks:
        assert s["kv_running_slots"] == 0 and s["kv_free_slots"] + s["kv_cached_slots"] == s["kv_pool_size"], s


def test_same_greedy_text_as_tp1(client, server, tp_server):
    assert answers(tp_server.url) == answers(server.url)


def test_stop_regex_is_a_400_under_tp(tp_server):
    r = httpx.post(tp_server.url + "/generate", json={"text": "hi", "sampling_params": {"stop_regex": "x+"}})
    assert r.status_code == 400 and "--tp > 1" in r.json()["error"]["message"], r.text
    assert_every_rank_idle(tp_server.url)


def test_abort_and_disconnect_free_slots_on_every_rank(tp_server):
    url = tp_server.url
    t = threading.Thread(target=lambda: httpx.post(url + "/generate", timeout=120, json={
        "text": "a long story", "sampling_params": LONG, "rid": "tp-abort"}))
    t.start()
    deadline = time.monotonic() + 30
    while httpx.get(url + "/get_server_info").json()["internal_states"][0]["num_running"] == 0:
        assert time.monotonic() < deadline, "the request never ran"
        time.sleep(0.05)
    assert httpx.post(url + "/abort_request", json={"rid": "tp-abort"}).status_code == 200
    t.join(30)
    assert_every_rank_idle(url)
    body = {"text": "another long story", "sampling_params": LONG, "stream": True}
    with httpx.stream("POST", url + "/generate", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for _, line in zip(range(40), r.iter_lines()) if line.startswith("data: {")]
    assert len(events) >= 3                            # left mid-stream: the connection closes
    assert_every_rank_idle(url)


def test_killing_a_rank_stops_the_server(tp_server):
    procs = descendants(tp_server.proc.pid)
    os.kill(child_pid(tp_server.proc.pid, "mini::tp1"), signal.SIGKILL)
    assert tp_server.proc.wait(30) == 1
    assert "the scheduler-tp1 process died (exit code -9)" in tp_server.log()
    assert_gone(procs)


def test_two_nodes_form_one_server(client, server, tmp_path):
    addr = f"127.0.0.1:{free_port()}"
    flags = ["--tp", "2", "--nnodes", "2", "--dist_init_addr", addr, "--dist_timeout", "60"]
    log1 = tmp_path / "node1.log"
    cmd = [sys.executable, "-m", "server.launch_server", "--model", "demo", "--device", "cpu",
           "--max_total_tokens", str(POOL_TOKENS), "--node_rank", "1", *flags]
    node1 = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log1, "w"), stderr=subprocess.STDOUT,
                             env=dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1"))
    node0 = None
    try:
        node0 = start_server(tmp_path, "--node_rank", "0", *flags, *SAME_AS_SESSION)
        assert answers(node0.url) == answers(server.url)
        procs = descendants(node0.proc.pid) + descendants(node1.pid)
        os.kill(child_pid(node1.pid, "mini::tp1"), signal.SIGKILL)        # rank 1 dies on node 1
        assert node1.wait(30) == 1, log1.read_text()[-2000:]
        assert node0.proc.wait(30) == 1, node0.log()[-2000:]            # node 0 notices through gloo
        assert "TP rank 0 lost contact with another rank" in node0.log()
        assert "the scheduler process died (exit code 1)" in node0.log()
        assert "TP rank 1 lost contact" not in log1.read_text()          # it was killed, not lost
        assert_gone(procs)
    finally:
        for p in (node1, node0.proc if node0 else None):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
