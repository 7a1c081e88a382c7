"""Admission: which waiting requests join the next extend batch (a part of `Scheduler`).

    _admit(prefilling) -> [(req, new tokens this step)]   unfinished chunks first, then
                                                          waiting requests in policy order

A request is admitted when its uncomputed prompt plus `max_new_tokens * ratio` fits in
what is free + evictable after the running requests' own future needs (`_available`).
The first request that does not fit stops admission (FIFO fairness), except that a
request sharing a long uncached prefix with a member of this very batch is skipped for
one step: by then that prefix is in the cache and it computes only the rest.
"""
from __future__ import annotations

from stage2_runner.kv_cache import OutOfSlots
from stage3_scheduler import req_kv
from stage3_scheduler.prefix_cache import NoPrefixCache
from stage3_scheduler.request import Req, Status

CLIP_MAX_NEW = 4096      # reserve at most this many future tokens per request (as SGLang)
IN_BATCH_SHARE_MIN = 32  # defer a request sharing this many uncached tokens with the batch


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Binary search on slice equality: ~log2(n) list compares that run in C, not n in Python."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Admission:
    """Mixed into Scheduler; uses its pool, cache, policy, args, ratio, waiting, running."""

    def _available(self) -> float:
        """Slots usable by new work: free + evictable - what running requests will still need."""
        future = sum(min(r.params.max_new_tokens - len(r.output_ids), CLIP_MAX_NEW) * self.ratio
                     + (r.prefill_len - len(r.slots)) for r in self.running)
        return self.pool.allocator.available_size() + self.cache.evictable_size() - future

    def _admit(self, prefilling: list[Req]) -> list[tuple[Req, int]]:
        """The next extend batch: continue chunked prefills, then admit waiting requests."""
        chunk = self.args.chunked_prefill_size if self.args.chunked_prefill_size > 0 else 1 << 30
        budget = min(self.args.max_prefill_tokens, chunk)
        batch = []
        for r in prefilling:
            if budget <= 0:
                break
            n = min(r.prefill_len - r.kv_len, budget)
            try:
                req_kv.grow(r, self.pool, self.cache, n)
            except OutOfSlots:
                break
            batch.append((r, n))
            budget -= n
        for r in self.policy.order(self.waiting, self.cache):
            if budget <= 0 or len(self.running) >= self.max_running:
                break
            if self.pool.allocator.pages_of(r.seq_len) > self.pool.allocator.num_pages:
                # Could never fit, even alone (chunked prefill would admit its first chunk,
                # then wait forever for slots for the next one).
                self._finish(r, {"type": "abort", "message": "prompt does not fit in the KV cache"}, False)
                continue
            prefix = len(self.cache.match_prefix(r.all_ids)[0])
            if self._shares_with_batch(r, prefix, batch):
                continue                                # next step it hits the cache instead
            need = r.seq_len - prefix + min(r.params.max_new_tokens - len(r.output_ids), CLIP_MAX_NEW) * self.ratio
            if need > self._available() and (self.running or batch):
                break                                   # wait for memory (keeps FIFO order)
            try:
                batch.append((r, self._start(r, budget)))
            except OutOfSlots:
                if not self.running and not batch:      # could never fit, even alone
                    self._finish(r, {"type": "abort", "message": "prompt does not fit in the KV cache"}, False)
                break
            budget -= batch[-1][1]
        return batch

    def _shares_with_batch(self, r: Req, cached: int, batch: list[tuple[Req, int]]) -> bool:
        """Would r recompute a long prefix that a request of this very batch is computing?
        Then defer it one step: that prefix is in the cache by then (SGLang does the same)."""
        if isinstance(self.cache, NoPrefixCache):
            return False
        P = self.cache.page_size              # only whole pages can be shared
        return any(common_prefix_len(r.all_ids, q.all_ids) // P * P - cached >= IN_BATCH_SHARE_MIN
                   for q, _ in batch)

    def _start(self, r: Req, budget: int) -> int:
        """Move r to running: attach its cached prefix and slots for its first chunk."""
        req_kv.attach_prefix(r, self.pool, self.cache)
        n = min(r.seq_len - r.kv_len, budget)
        try:
            req_kv.grow(r, self.pool, self.cache, n)
        except OutOfSlots:
            req_kv.release(r, self.pool, self.cache, keep_in_cache=False)
            raise
        if r.num_retractions == 0:
            r.cached_tokens = r.cached_len
            self.cache_hit_tokens += r.cached_len
        r.prefill_len, r.status = r.seq_len, Status.RUNNING
        self.waiting.remove(r)
        self.running.append(r)
        return n
