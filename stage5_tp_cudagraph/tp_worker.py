"""Keeping tensor-parallel ranks in lock-step: rank 0 decides, every other rank follows.

Each rank runs a whole scheduler (same code, same KV pool size, same radix cache), but
only rank 0 hears about requests. Rank 0's scheduler is wrapped in `CommandBroadcaster`:
add_request / abort / flush_cache apply locally at once and are queued; every step()
first broadcasts the queue (one JSON message over the gloo CPU group), then steps.
Ranks > 0 run `follow`: receive a message, apply its commands in the same order, step.
Same state + same commands in the same order = the same batches on every rank, so
their collectives pair up; the runner broadcasts rank 0's sampled ids, so the outputs
that feed the next step are the same too.

    rank 0                                   rank r > 0
    add_request(req) -> queue + apply        follow(): loop
    step():  broadcast {"op": "step",   -->      apply cmds; sched.step()
                        "cmds": [...]}
             sched.step()   (forward: all-reduces pair up with rank r's)

Messages are JSON, never pickle: {"op": "step" | "sync" | "stats" | "stop", "cmds": [...]},
cmds ["add", rid, input_ids, sampling params, return_logprob, top_logprobs_num, token_ids_logprob,
logprob_start_len] (every rank computes the same prompt logprobs: lm_head all-gathers),
["abort", rid], ["flush"]. `stats` gathers every rank's KV books (each rank's own
pool, so a leak on any rank shows); `sync` only delivers commands (a keep-alive).
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import threading
import time
from dataclasses import asdict

from stage3_scheduler.request import Req
from stage3_scheduler.sampling_params import SamplingParams

log = logging.getLogger(__name__)
STAT_KEYS = ("num_running", "num_waiting", "kv_pool_size", "kv_free_slots", "kv_cached_slots", "kv_running_slots")


class TPRankLost(RuntimeError):
    """A peer rank vanished: serving cannot go on (its shard of every layer is gone)."""


class CommandBroadcaster:
    """Rank 0's scheduler, as seen by the Engine and the server: same API, commands mirrored."""

    def __init__(self, sched, tp):
        self.sched, self.tp = sched, tp
        self.pending: list[list] = []
        self.last_sent = time.monotonic()

    def __getattr__(self, name):              # running, waiting, has_work, check_invariant, ...
        return getattr(self.sched, name)

    def add_request(self, req: Req) -> None:
        if req.params.stop_regex:   # each rank checks stops itself; a regex timeout could differ
            raise ValueError("stop_regex is not supported with tensor parallelism yet "
                             "(its search is time-bounded on each rank)")
        self.sched.add_request(req)
        self.pending.append(["add", req.rid, list(req.input_ids), asdict(req.params), req.return_logprob,
                             req.top_logprobs_num, list(req.token_ids_logprob), req.logprob_start_len])

    def abort(self, rid: str) -> None:
        self.sched.abort(rid)
        self.pending.append(["abort", rid])

    def flush_cache(self) -> bool:
        self.pending.append(["flush"])        # the other ranks have the same state: same answer
        return self.sched.flush_cache()

    def step(self):
        self._send("step")
        return self.sched.step()

    def stats(self) -> dict:
        """Rank 0's stats, plus `tp_ranks`: the KV books of every rank."""
        self._send("stats")
        s = self.sched.stats()
        s["tp_ranks"] = [dict(zip(STAT_KEYS, v)) for v in self.tp.gather_ints([s[k] for k in STAT_KEYS])]
        return s

    def keepalive(self, every_s: float = 1.0) -> None:
        """While idle: a message now and then, so a dead rank is noticed before a request is."""
        if time.monotonic() - self.last_sent >= every_s:
            self._send("sync")

    def stop(self) -> None:
        self._send("stop")

    def _send(self, op: str) -> None:
        msg, self.pending = {"op": op, "cmds": self.pending}, []
        try:
            self.tp.broadcast_bytes(json.dumps(msg).encode())
        except RuntimeError as e:                 # gloo: "Connection closed by peer" and the like
            raise TPRankLost(f"TP rank 0 lost contact with another rank; did a rank's process die? "
                             f"({str(e).splitlines()[0]})") from None
        self.last_sent = time.monotonic()


def apply(sched, cmd: list, vocab_size: int) -> None:
    if cmd[0] == "add":
        _, rid, ids, params, logprob, top, token_ids, start = cmd
        sched.add_request(Req(rid, ids, SamplingParams.from_dict(params, vocab_size), return_logprob=logprob,
                              top_logprobs_num=top, token_ids_logprob=token_ids, logprob_start_len=start))
    elif cmd[0] == "abort":
        sched.abort(cmd[1])
    elif cmd[0] == "flush":
        sched.flush_cache()
    else:
        raise ValueError(f"unknown TP command {cmd[0]!r}")


def follow(sched, tp, vocab_size: int) -> None:
    """Ranks > 0: mirror rank 0 until it says stop (or its process dies: gloo raises)."""
    while True:
        try:
            msg = json.loads(tp.broadcast_bytes())
        except RuntimeError as e:
            raise TPRankLost(f"TP rank {tp.rank} lost contact with rank 0; did its process die? "
                             f"({str(e).splitlines()[0]})") from None
        for cmd in msg["cmds"]:
            apply(sched, cmd, vocab_size)
        if msg["op"] == "step":
            sched.step()
        elif msg["op"] == "stats":
            s = sched.stats()
            tp.gather_ints([s[k] for k in STAT_KEYS])
        elif msg["op"] == "stop":
            return


# ---------------------------------------------------------------- offline followers

def watch_parent(parent_pid: int) -> None:
    """Exit as soon as the process that started us is gone (no orphans, even after a SIGKILL)."""
    def loop():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=loop, daemon=True, name="watch-parent").start()


def follower_main(model: str, options: dict, stage5: dict, parent_pid: int) -> None:
    """A spawned rank > 0 of an offline Engine: build the same Engine, then follow rank 0."""
    watch_parent(parent_pid)
    from stage5_tp_cudagraph.engine import Engine      # (engine.py imports this module)
    engine = Engine(model, **options, **stage5)
    try:
        follow(engine.scheduler, engine.tp, engine.runner.config.vocab_size)
    finally:
        engine.close()


def spawn_followers(model: str, options: dict, stage5: dict, ranks: range) -> list:
    """Start one process per rank in `ranks` (spawn: a fresh interpreter, no forked CUDA state)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=follower_main, args=(model, options, dict(stage5, tp_rank=r), os.getpid()),
                         name=f"tp-rank-{r}", daemon=True) for r in ranks]
    for p in procs:
        p.start()
    return procs


def stop_followers(procs: list, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            log.warning("TP follower %s did not stop in time; killing it", p.name)
            p.kill()
            p.join()
