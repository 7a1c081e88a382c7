"""Scheduler trace: one JSON line per step, off unless a path is given.

Each line: {"step", "t" (s since start), "mode" (extend|decode), "batch_size", "tokens",
"running", "waiting", "slots_used", "slots_free", "slots_cached", "cache_hit_tokens",
"retractions"}. `python -m stage3_scheduler.plot_trace trace.jsonl` draws it.
"""
from __future__ import annotations

import json
import time


class Tracer:
    def __init__(self, path: str | None):
        self.file = open(path, "w", buffering=1) if path else None
        self.t0, self.step = time.perf_counter(), 0

    def record(self, sched, mode: str, batch_size: int, tokens: int) -> None:
        self.step += 1
        if self.file is None:
            return
        s = sched.stats()
        self.file.write(json.dumps({
            "step": self.step, "t": round(time.perf_counter() - self.t0, 6), "mode": mode,
            "batch_size": batch_size, "tokens": tokens, "running": s["num_running"],
            "waiting": s["num_waiting"], "slots_used": s["kv_running_slots"],
            "slots_free": s["kv_free_slots"], "slots_cached": s["kv_cached_slots"],
            "cache_hit_tokens": s["cache_hit_tokens"], "retractions": s["total_retractions"]}) + "\n")

    def close(self) -> None:
        if self.file:
            self.file.close()
