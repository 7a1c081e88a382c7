"""A bounded soak / fuzz run against a real server on loopback; exits 1 on any problem.

    python -m bench.soak --seconds 60 --clients 16                  # starts a demo server (CPU, tiny pool)
    python -m bench.soak --url http://127.0.0.1:30000 --seconds 600  # or soaks a running one

Each client loops over a random mix: native and OpenAI (completions, chat), stream and not,
n > 1, clients that disconnect mid-stream, aborts by rid, and bad requests that must get 400.
At the end it checks: zero unexpected outcomes (5xx, wrong status, broken streams), every KV
slot back after a flush, and a flat RSS of the server's main process. It prints one JSON
summary: requests, outcomes by kind, latency p50/p99, RSS before/after, slots after flush.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

HEADERS = {"content-type": "application/json"}
BAD = [{"text": ""}, {"input_ids": [-1]}, {"text": "x", "sampling_params": {"temperature": -1}},
       {"text": "x", "sampling_params": {"n": 99}}, {"text": "x", "sampling_params": {"top_p": 0}}]


def gen_params(rng) -> dict:
    return {"max_new_tokens": rng.randint(1, 64), "temperature": rng.choice([0, 0.7, 1.0]), "ignore_eos": True}


async def run_one(c: httpx.AsyncClient, rng: random.Random, i: int) -> str:
    """One random request; returns an outcome name ("ok", "bad_400", ...) or raises."""
    kind = rng.choice(["native", "native_stream", "native_n", "completion", "completion_stream", "chat",
                       "chat_stream", "disconnect", "abort", "bad"])
    if kind == "bad":
        r = await c.post("/generate", json=rng.choice(BAD))
        return "bad_400" if r.status_code == 400 else f"unexpected_{r.status_code}"
    if kind == "abort":
        rid = f"soak-{i}"
        task = asyncio.ensure_future(c.post("/generate", json={"text": "abort me", "rid": rid,
                                                               "sampling_params": {"max_new_tokens": 512}}))
        await asyncio.sleep(rng.uniform(0.0, 0.2))
        await c.post("/abort_request", json={"rid": rid})
        r = await task
        return "aborted" if r.status_code == 200 else f"unexpected_{r.status_code}"
    path, body = _request(kind, rng)
    if "stream" in kind or kind == "disconnect":
        return await _stream(c, path, body, leave_early=kind == "disconnect")
    r = await c.post(path, json=body)
    return "ok" if r.status_code == 200 else f"unexpected_{r.status_code}"


def _request(kind: str, rng) -> tuple[str, dict]:
    p = gen_params(rng)
    if kind.startswith("completion"):
        return "/v1/completions", {"prompt": "soak test " * rng.randint(1, 30), "max_tokens": p["max_new_tokens"],
                                   "temperature": p["temperature"], "stream": "stream" in kind}
    if kind.startswith("chat"):
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * rng.randint(1, 30)}],
                                        "max_tokens": p["max_new_tokens"], "stream": "stream" in kind}
    if kind == "native_n":
        p["n"] = rng.randint(2, 4)
    return "/generate", {"text": "soak " * rng.randint(1, 60), "sampling_params": p,
                         "stream": kind in ("native_stream", "disconnect")}


EXAMPLES: dict[str, str] = {}      # the first case of each unexpected outcome, for the summary


async def _stream(c, path: str, body: dict, leave_early: bool) -> str:
    async with c.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return f"unexpected_{r.status_code}"
        async for line in r.aiter_lines():
            if leave_early and line.startswith("data: {"):
                return "disconnected"                 # closing the stream aborts the request
            # An error event has a top-level "error" key; the word in generated text is not one.
            if line.startswith("data: {") and "error" in json.loads(line[len("data: "):]):
                EXAMPLES.setdefault("unexpected_stream_error", f"{path}: {line[:300]}")
                return "unexpected_stream_error"
            if line == "data: [DONE]":
                return "ok"
    return "unexpected_no_done"


async def client_loop(url: str, seed: int, deadline: float, outcomes, latencies) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=HEADERS) as c:
        i = 0
        while time.monotonic() < deadline:
            t0, i = time.monotonic(), i + 1
            try:
                outcome = await run_one(c, rng, seed * 1_000_000 + i)
            except httpx.HTTPError as e:
                outcome = f"unexpected_{type(e).__name__}"
            outcomes[outcome] += 1
            latencies.append(time.monotonic() - t0)


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def start_server(port: int, pool: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.launch_server", "--model", "demo", "--device", "cpu", "--port", str(port),
           "--max_total_tokens", str(pool), "--log_level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


def settle(url: str) -> dict:
    """Wait until idle, flush the prefix cache, return the scheduler's KV state."""
    for _ in range(600):
        state = httpx.get(url + "/get_server_info", timeout=30).json()["internal_states"][0]
        if state["num_running"] == 0 and state["num_waiting"] == 0 and httpx.post(url + "/flush_cache").is_success:
            return httpx.get(url + "/get_server_info", timeout=30).json()["internal_states"][0]
        time.sleep(0.1)
    return state


async def soak(url: str, seconds: float, clients: int) -> tuple[collections.Counter, list[float]]:
    outcomes, latencies = collections.Counter(), []
    deadline = time.monotonic() + seconds
    await asyncio.gather(*[client_loop(url, s + 1, deadline, outcomes, latencies) for s in range(clients)])
    return outcomes, latencies


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="soak a running server (default: start a demo server)")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--pool", type=int, default=1024, help="KV slots of the started server (small: retractions)")
    ap.add_argument("--port", type=int, default=30123)
    ap.add_argument("--max_rss_growth_mb", type=float, default=64)
    args = ap.parse_args(argv)
    proc = None if args.url else start_server(args.port, args.pool)
    url, pid = args.url or f"http://127.0.0.1:{args.port}", None if args.url else proc.pid
    try:
        asyncio.run(soak(url, min(args.seconds, 3), 2))        # warm-up: allocator and caches settle
        rss_before = rss_mb(pid)
        outcomes, lat = asyncio.run(soak(url, args.seconds, args.clients))
        state = settle(url)
        rss_after = rss_mb(pid)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    lat.sort()
    unexpected = {k: v for k, v in outcomes.items() if k.startswith("unexpected")}
    summary = {"requests": sum(outcomes.values()), "outcomes": dict(outcomes), "unexpected": unexpected,
               "p50_s": round(lat[len(lat) // 2], 3) if lat else None,
               "p99_s": round(lat[int(len(lat) * 0.99)], 3) if lat else None,
               "rss_mb_before": rss_before, "rss_mb_after": rss_after, "retractions": state["total_retractions"],
               "kv_free_after_flush": state["kv_free_slots"], "kv_pool_size": state["kv_pool_size"],
               "examples": EXAMPLES}
    ok = not unexpected and state["kv_free_slots"] == state["kv_pool_size"] and \
        (pid is None or rss_after - rss_before < args.max_rss_growth_mb)
    print(json.dumps({**summary, "ok": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
