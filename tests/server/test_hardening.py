"""Hardening on the shared live server: one test per way a request used to hurt the server.

Sizes are refused before any work (the RSS of the main process does not grow), chat templates
come only from the model, browsers cannot drive the API, batches are bounded, rids are
matched by structure, and hostile bodies on every POST route give 4xx, never 5xx.
"""
from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from live_server import assert_no_leak, wait_idle

pytestmark = pytest.mark.server
CHAR_LIMIT = 8192 * 10          # the demo model's context x 10 characters per token
LONG = {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 0}


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def raw_request(url: str, head: bytes) -> bytes:
    """Send bytes on a fresh socket and return the reply (for headers httpx would not send)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):     # headers, then the JSON body
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


# ---- 1. sizes: refused before tokenizing, without memory growth --------------------------
def test_prompt_over_char_limit_is_413_without_rss_growth(client, server):
    client.post("/generate", json={"text": "warm up", "sampling_params": {"max_new_tokens": 1}})
    before = rss_kb(server.proc.pid)
    for _ in range(5):              # tokenizing even one of these would take ~40 MB
        r = client.post("/generate", json={"text": "a b " * (CHAR_LIMIT // 2)})
        assert r.status_code == 413 and "--max_prompt_chars" in r.json()["error"]["message"]
    assert rss_kb(server.proc.pid) - before < 8 * 1024


def test_declared_body_over_limit_is_413_before_reading(server):
    reply = raw_request(server.url, b"POST /generate HTTP/1.1\r\nHost: localhost\r\n"
                                    b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413") and b"--max_request_bytes" in reply


def test_too_many_prompts_and_sequences(client):
    r = client.post("/v1/completions", json={"prompt": ["hi"] * 1025, "max_tokens": 1})
    assert r.status_code == 400 and "--max_prompts_per_request" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": ["hi"] * 100, "n": 16, "max_tokens": 1})
    assert r.status_code == 400 and "prompts x n" in r.json()["error"]["message"]
    r = client.post("/generate", json={"text": ["hi"] * 100, "sampling_params": {"n": 16}})
    assert r.status_code == 400


def test_conversation_over_char_limit_is_413(client):
    msgs = [{"role": "user", "content": "x" * (CHAR_LIMIT // 2 + 1)}] * 2
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1})
    assert r.status_code == 413


# ---- 2. templates come from the model or the operator, never the request --------------
def test_request_cannot_supply_a_chat_template(client):
    hi = [{"role": "user", "content": "hi"}]
    for kwargs in ({"chat_template": "{{7*7}}"}, {"tokenize": True}, {"messages": []}, {"__class__": 1}):
        r = client.post("/v1/chat/completions", json={"messages": hi, "max_tokens": 1, "chat_template_kwargs": kwargs})
        assert r.status_code == 400, (kwargs, r.text)
    r = client.post("/v1/chat/completions",
                    json={"messages": hi, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text


# ---- 3. former 500s ----------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions", "/abort_request"])
def test_huge_integer_literal_is_400(client, path):
    r = client.post(path, content=b'{"max_tokens": 1' + b"0" * 5000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid JSON" in r.json()["error"]["message"]


def test_unhashable_model_is_400(client):
    for body in ({"prompt": "hi", "model": []}, {"prompt": "hi", "model": {}}):
        assert client.post("/v1/completions", json=body).status_code == 400


# ---- 5. browsers cannot drive it ---------------------------------------------------------
@pytest.mark.parametrize("headers", [{"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"},
                                     {"content-type": "multipart/form-data; boundary=x"}, {}])
def test_post_bodies_must_be_json(client, headers):
    r = client.post("/abort_request", content=b'{"abort_all": true}', headers=headers)
    assert r.status_code == 415 and r.json()["error"]["code"] == 415


@pytest.mark.parametrize("headers, status", [
    ({"host": "evil.example"}, 400), ({"host": "evil.example:30000"}, 400),
    ({"origin": "http://evil.example"}, 403), ({"origin": "null"}, 403), ({"sec-fetch-site": "cross-site"}, 403)])
def test_rebinding_and_cross_site_requests_are_refused(client, headers, status):
    for method, path in (("GET", "/flush_cache"), ("POST", "/flush_cache"), ("GET", "/get_server_info")):
        assert client.request(method, path, headers=headers).status_code == status


def test_localhost_names_and_same_origin_are_accepted(client):
    for host in ("localhost", "127.0.0.1:1234", "[::1]:30000", "LOCALHOST"):
        assert client.get("/get_model_info", headers={"host": host}).status_code == 200
    assert client.get("/get_model_info", headers={"origin": "http://localhost:3000"}).status_code == 200
    assert client.post("/flush_cache").status_code == 200          # no body: no content type needed


# ---- 7. rids: matched by structure, never revealed ----------------------------------------
def test_abort_matches_its_own_requests_only(client, server):
    results = {}

    def run(rid, n):
        results[rid] = httpx.post(server.url + "/generate", timeout=120,
                                  json={"text": "x", "rid": rid, "sampling_params": {**LONG, "n": n}})
    threads = [threading.Thread(target=run, args=a) for a in (("job", 2), ("job-1", 1))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while client.get("/get_server_info").json()["internal_states"][0]["num_running"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.post("/abort_request", json={"rid": "job"}).json() == {"aborted": ["job"]}
    threads[0].join(30)
    assert [o["meta_info"]["finish_reason"]["type"] for o in results["job"].json()] == ["abort", "abort"]
    assert [o["meta_info"]["id"] for o in results["job"].json()] == ["job-0", "job-1"]
    assert threads[1].is_alive()                    # the other client's "job-1" still runs
    assert client.post("/abort_request", json={"rid": "job-1"}).json() == {"aborted": ["job-1"]}
    threads[1].join(30)
    assert results["job-1"].json()["meta_info"]["finish_reason"]["type"] == "abort"
    assert_no_leak(wait_idle(client))


def test_a_rid_in_use_is_not_revealed(client, server):
    t = threading.Thread(target=lambda: httpx.post(server.url + "/generate", timeout=120,
                                                   json={"text": "x", "rid": "secret", "sampling_params": LONG}))
    t.start()
    time.sleep(0.3)
    r = client.post("/generate", json={"text": "y", "rid": "secret", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200 and r.json()["meta_info"]["id"] == "secret"
    client.post("/abort_request", json={"rid": "secret"})
    t.join(30)
    assert_no_leak(wait_idle(client))


# ---- 9. 405 keeps Allow ---------------------------------------------------------------------
def test_405_has_allow_header(client):
    r = client.get("/generate")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["code"] == 405
