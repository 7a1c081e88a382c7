"""Noticing a scheduler that stopped stepping (frozen, deadlocked, SIGSTOPped, stuck in a kernel).

    hb = Heartbeat(timeout_s, probe=send_stats_request, on_stall=..., on_recover=...)
    hb.beat()              # every message from the scheduler side proves it is alive
    await hb.run(busy)     # background task; busy() says whether we are waiting on the scheduler

A dead child is the launcher watchdog's job; a *living* scheduler that no longer steps looks
healthy to it, and every request would hang. The scheduler reads its socket between steps,
so a probe (a StatsReq) is answered within one step: while we wait on the scheduler and it
has been quiet for half the timeout, we probe it; quiet for the whole timeout means one step
took that long, and it is declared stalled: `on_stall` fails what is in flight with 503 and
logs it, new requests get 503 until something arrives again (`on_recover`).
An idle server is never declared stalled; `/health` probes it directly instead.
"""
from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, timeout_s: float, probe, on_stall, on_recover=lambda: None):
        self.timeout = timeout_s
        self.probe, self.on_stall, self.on_recover = probe, on_stall, on_recover
        self.last_seen = time.monotonic()
        self.last_probe = 0.0
        self.stalled = False

    def beat(self) -> None:
        self.last_seen = time.monotonic()
        if self.stalled:
            self.stalled = False
            log.warning("the scheduler answers again; accepting requests")
            self.on_recover()

    def check(self, busy: bool, now: float) -> None:
        """One tick: probe a quiet scheduler, declare a silent one stalled."""
        if not busy and not self.stalled:       # nothing asked of it: silence is not a stall
            self.last_seen = now
            return
        quiet = now - self.last_seen
        # Probe a quiet scheduler; keep probing a stalled one, so its recovery is noticed.
        if (quiet > self.timeout / 2 or self.stalled) and now - self.last_probe > self.timeout / 4:
            self.last_probe = now
            self.probe()
        if quiet > self.timeout and not self.stalled:
            self.stalled = True
            log.error("SCHEDULER STALLED: no step for %.1f s while requests wait (--watchdog_timeout %.1f); "
                      "failing requests with 503", quiet, self.timeout)
            self.on_stall()

    async def run(self, busy) -> None:
        tick = min(max(self.timeout / 8, 0.05), 1.0)
        while True:
            await asyncio.sleep(tick)
            try:
                self.check(busy(), time.monotonic())
            except Exception:  # noqa: BLE001 - the monitor must outlive a bug in a callback
                log.exception("heartbeat check failed")
