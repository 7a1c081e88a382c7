"""Noticing a child process that stopped working (frozen, deadlocked, SIGSTOPped, stuck in a kernel).

    live = Liveness(timeout_s, probe_scheduler=..., probe_detokenizer=..., on_stall=fn(who))
    live.saw(msg)                        # every message received proves its sender(s) alive
    await live.run(scheduler_busy, detokenizer_busy)     # background task
    live.stalled                         # None, or the name of the stalled process

A dead child is the launcher watchdog's job; a *living* child that no longer works looks
healthy to it, and every request would hang. Both children read their socket between units
of work, so a probe is answered within one unit: the scheduler answers a StatsReq between
steps, the detokenizer echoes a Ping between batches. While we wait on a child and it has
been quiet for half the timeout, we probe it; quiet for the whole timeout means one unit
took that long, and it is declared stalled: `on_stall(who)` fails what is in flight with
503 and logs it, new requests get 503 until it answers again.
An idle server is never declared stalled; `/health` probes both children directly instead.

Why watch the detokenizer separately: the scheduler's control replies come straight to the
main process, so they keep the scheduler's heartbeat going while a frozen detokenizer holds
every token back; only an answer that travelled through the detokenizer proves it works.
"""
from __future__ import annotations

import asyncio
import logging
import time

from server.managers import io_struct as io

log = logging.getLogger(__name__)


class Heartbeat:
    """One watched process: when it was last heard from, whether it is declared stalled."""

    def __init__(self, timeout_s: float, probe, on_stall, on_recover=lambda: None, name: str = "scheduler"):
        self.timeout, self.name = timeout_s, name
        self.probe, self.on_stall, self.on_recover = probe, on_stall, on_recover
        self.last_seen = time.monotonic()
        self.last_probe = 0.0
        self.stalled = False

    def beat(self) -> None:
        self.last_seen = time.monotonic()
        if self.stalled:
            self.stalled = False
            log.warning("the %s answers again; accepting requests", self.name)
            self.on_recover()

    def check(self, busy: bool, now: float) -> None:
        """One tick: probe a quiet process, declare a silent one stalled."""
        if not busy and not self.stalled:       # nothing asked of it: silence is not a stall
            self.last_seen = now
            return
        quiet = now - self.last_seen
        # Probe a quiet process; keep probing a stalled one, so its recovery is noticed.
        if (quiet > self.timeout / 2 or self.stalled) and now - self.last_probe > self.timeout / 4:
            self.last_probe = now
            self.probe()
        if quiet > self.timeout and not self.stalled:
            self.stalled = True
            log.error("%s STALLED: silent for %.1f s while requests wait (--watchdog_timeout %.1f); "
                      "failing requests with 503", self.name.upper(), quiet, self.timeout)
            self.on_stall()

    async def run(self, busy) -> None:
        tick = min(max(self.timeout / 8, 0.05), 1.0)
        while True:
            await asyncio.sleep(tick)
            try:
                self.check(busy(), time.monotonic())
            except Exception:  # noqa: BLE001 - the monitor must outlive a bug in a callback
                log.exception("%s heartbeat check failed", self.name)


class Liveness:
    """The scheduler's and the detokenizer's heartbeats, and which message proves whom alive."""

    def __init__(self, timeout_s: float, probe_scheduler, probe_detokenizer, on_stall):
        self.scheduler = Heartbeat(timeout_s, probe_scheduler, lambda: on_stall("scheduler"), name="scheduler")
        self.detokenizer = Heartbeat(timeout_s, probe_detokenizer, lambda: on_stall("detokenizer"),
                                     name="detokenizer")

    @property
    def timeout(self) -> float:
        return self.scheduler.timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self.scheduler.timeout = self.detokenizer.timeout = seconds

    @property
    def stalled(self) -> str | None:
        """The stalled process's name (the scheduler first: it explains a silent detokenizer too)."""
        return next((h.name for h in (self.scheduler, self.detokenizer) if h.stalled), None)

    def saw(self, msg) -> None:
        if isinstance(msg, io.Ping):            # echoed by the detokenizer: says nothing of the scheduler
            self.detokenizer.beat()
        elif isinstance(msg, io.BatchStrOut):   # tokens the scheduler made, through the detokenizer
            self.scheduler.beat()
            self.detokenizer.beat()
        else:                                   # control replies come straight from the scheduler
            self.scheduler.beat()

    async def run(self, scheduler_busy, detokenizer_busy) -> None:
        await asyncio.gather(self.scheduler.run(scheduler_busy), self.detokenizer.run(detokenizer_busy))
