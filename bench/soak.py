"""A bounded soak / fuzz run against a real server on loopback; exits 1 on any problem.

    python -m bench.soak --seconds 60 --clients 16                  # starts a demo server (CPU, tiny pool)
    python -m bench.soak --url http://127.0.0.1:30000 --seconds 600  # or soaks a running one
        [--server_pid PID]                                          # ... and watches its RSS

Each client loops over a random mix: native and OpenAI (completions, chat), stream and not,
n > 1, clients that disconnect mid-stream, aborts by rid, and bad requests that must get 400.
At the end it checks: zero unexpected outcomes (5xx, wrong status, broken streams, an abort
that hit but did not end its request), every KV slot back after a flush, and a flat RSS of the
server's main process (measured after a warm-up that sends every kind of request once, so lazy
imports and caches are not taken for a leak). It prints one JSON summary: requests, outcomes
by kind, latency p50/p99, RSS of each server process before/after, slots after flush, and the
first example of each unexpected outcome; with a started server, the tail of its log on failure.
Timeouts are generous on purpose: a loaded 2-core CI box is slow, and slowness is not a failure.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HEADERS = {"content-type": "application/json"}
BAD = [{"text": ""}, {"input_ids": [-1]}, {"text": "x", "sampling_params": {"temperature": -1}},
       {"text": "x", "sampling_params": {"n": 99}}, {"text": "x", "sampling_params": {"top_p": 0}}]


def gen_params(rng) -> dict:
    return {"max_new_tokens": rng.randint(1, 64), "temperature": rng.choice([0, 0.7, 1.0]), "ignore_eos": True}


KINDS = ["native", "native_stream", "native_n", "completion", "completion_stream", "chat", "chat_stream",
         "disconnect", "abort", "bad"]
EXAMPLES: dict[str, str] = {}      # the first case of each unexpected outcome, for the summary


def unexpected(what: str, detail: str) -> str:
    EXAMPLES.setdefault(f"unexpected_{what}", detail[:300])
    return f"unexpected_{what}"


def status(r: httpx.Response, want: int, name: str) -> str:
    return name if r.status_code == want else unexpected(str(r.status_code), f"{r.request.url.path}: {r.text}")


async def run_one(c: httpx.AsyncClient, rng: random.Random, i: int, kind: str | None = None) -> str:
    """One request of `kind` (default: random); returns an outcome name ("ok", "bad_400", ...) or raises."""
    kind = kind or rng.choice(KINDS)
    if kind == "bad":
        return status(await c.post("/generate", json=rng.choice(BAD)), 400, "bad_400")
    if kind == "abort":
        return await _abort(c, rng, f"soak-{i}")
    path, body = _request(kind, rng)
    if "stream" in kind or kind == "disconnect":
        return await _stream(c, path, body, leave_early=kind == "disconnect")
    return status(await c.post(path, json=body), 200, "ok")


async def _abort(c: httpx.AsyncClient, rng: random.Random, rid: str) -> str:
    """Abort a long request by rid. The abort is retried until the server knows the rid (the
    request may still be on its way): one sent too early would miss, and the 512 tokens would
    then run to the end, testing nothing and slowing the soak (p99 28 s on a loaded 2-core box)."""
    task = asyncio.ensure_future(c.post("/generate", json={"text": "abort me", "rid": rid,
                                                           "sampling_params": {"max_new_tokens": 512}}))
    await asyncio.sleep(rng.uniform(0.0, 0.2))
    hit = False
    while not task.done() and not hit:
        a = await c.post("/abort_request", json={"rid": rid})
        if a.status_code != 200:
            task.cancel()
            return status(a, 200, "")
        hit = a.json()["aborted"] == [rid]
        await asyncio.sleep(0 if hit else 0.05)
    r = await task
    if r.status_code != 200:
        return status(r, 200, "")
    # An abort that reaches the scheduler just after the last token is a real race, not a fault.
    return "aborted" if r.json()["meta_info"]["finish_reason"]["type"] == "abort" else "finished_before_abort"


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


async def _stream(c, path: str, body: dict, leave_early: bool) -> str:
    async with c.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return status(r, 200, "")
        async for line in r.aiter_lines():
            if leave_early and line.startswith("data: {"):
                return "disconnected"                 # closing the stream aborts the request
            # An error event has a top-level "error" key; the word in generated text is not one.
            if line.startswith("data: {") and "error" in json.loads(line[len("data: "):]):
                return unexpected("stream_error", f"{path}: {line}")
            if line == "data: [DONE]":
                return "ok"
    return unexpected("no_done", f"{path}: {json.dumps(body)}")


async def client_loop(url: str, seed: int, deadline: float, outcomes, latencies, slowest) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=HEADERS) as c:
        i = 0
        while time.monotonic() < deadline:
            t0, i, kind = time.monotonic(), i + 1, rng.choice(KINDS)
            try:
                outcome = await run_one(c, rng, seed * 1_000_000 + i, kind)
            except httpx.HTTPError as e:
                outcome = unexpected(type(e).__name__, f"{kind}: {e!r}")
            outcomes[outcome] += 1
            latencies.append(time.monotonic() - t0)
            slowest[kind] = round(max(slowest.get(kind, 0), latencies[-1]), 2)     # where a p99 comes from


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:                                   # the process exited meanwhile
        pass
    return None


def server_rss(pid: int | None) -> dict[str, float | None]:
    """RSS (MB) of the launcher ("main") and each child by its process name, e.g. mini::scheduler."""
    if pid is None:
        return {}
    rss = {"main": rss_mb(pid)}
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        try:
            rss[Path(f"/proc/{child}/comm").read_text().strip()] = rss_mb(int(child))
        except OSError:                               # exited between listing and reading
            continue
    return rss


def start_server(port: int, pool: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.launch_server", "--model", "demo", "--device", "cpu", "--port", str(port),
           "--max_total_tokens", str(pool), "--log_level", "warning"]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600              # a loaded CI box loads the model slowly
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start:\n" + log_path.read_text(errors="replace")[-3000:])


def settle(url: str, seconds: float = 120) -> dict:
    """Wait until idle, flush the prefix cache, return the scheduler's KV state. Aborted and
    disconnected requests end within a step, but a step may be slow on a loaded box: the
    deadline is long, and every call has a timeout well above one step."""
    deadline = time.monotonic() + seconds
    while True:
        state = httpx.get(url + "/get_server_info", timeout=30).json()["internal_states"][0]
        idle = state["num_running"] == 0 and state["num_waiting"] == 0
        if idle and httpx.post(url + "/flush_cache", timeout=30).is_success or time.monotonic() > deadline:
            return httpx.get(url + "/get_server_info", timeout=30).json()["internal_states"][0]
        time.sleep(0.1)


async def soak(url: str, seconds: float, clients: int) -> tuple[collections.Counter, list[float], dict]:
    outcomes, latencies, slowest = collections.Counter(), [], {}
    deadline = time.monotonic() + seconds
    await asyncio.gather(*[client_loop(url, s + 1, deadline, outcomes, latencies, slowest) for s in range(clients)])
    return outcomes, latencies, slowest


async def warm_up(url: str, seconds: float) -> collections.Counter:
    """Every kind of request once, then a short random mix: whatever the server builds lazily
    (imports, compiled templates, allocator pools) exists before RSS is first measured. Its
    outcomes count like the others, so every kind is checked at least once however short the run."""
    rng, outcomes = random.Random(0), collections.Counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=HEADERS) as c:
        for i, kind in enumerate(KINDS):
            outcomes[await run_one(c, rng, -i - 1, kind)] += 1
    return outcomes + (await soak(url, seconds, 2))[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="soak a running server (default: start a demo server)")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--pool", type=int, default=1024, help="KV slots of the started server (small: retractions)")
    ap.add_argument("--port", type=int, default=30123)
    ap.add_argument("--server_pid", type=int, default=None,
                    help="with --url: the server's launcher pid, so its RSS is watched too (same machine)")
    ap.add_argument("--max_rss_growth_mb", type=float, default=32,
                    help="of the main process, over the run (noise after the warm-up is under 1 MB)")
    args = ap.parse_args(argv)
    log_path = Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
    proc = None if args.url else start_server(args.port, args.pool, log_path)
    url, pid = args.url or f"http://127.0.0.1:{args.port}", args.server_pid if args.url else proc.pid
    try:
        warm = asyncio.run(warm_up(url, min(args.seconds, 3)))
        rss_before = server_rss(pid)
        outcomes, lat, slowest = asyncio.run(soak(url, args.seconds, args.clients))
        outcomes += warm
        state = settle(url)
        rss_after = server_rss(pid)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    lat.sort()
    bad = {k: v for k, v in outcomes.items() if k.startswith("unexpected")}
    growth = rss_after["main"] - rss_before["main"] if pid is not None else None
    summary = {"requests": sum(outcomes.values()), "outcomes": dict(outcomes), "unexpected": bad,
               "p50_s": round(lat[len(lat) // 2], 3) if lat else None,
               "p99_s": round(lat[int(len(lat) * 0.99)], 3) if lat else None, "slowest_s": slowest,
               "rss_mb_before": rss_before, "rss_mb_after": rss_after, "retractions": state["total_retractions"],
               "kv_free_after_flush": state["kv_free_slots"], "kv_pool_size": state["kv_pool_size"],
               "examples": EXAMPLES}
    ok = not bad and state["kv_free_slots"] == state["kv_pool_size"] and \
        (growth is None or growth < args.max_rss_growth_mb)
    print(json.dumps({**summary, "ok": ok}, indent=1))
    if not ok and proc is not None:
        print("server log (tail):\n" + log_path.read_text(errors="replace")[-3000:])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
