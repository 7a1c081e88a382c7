"""Scheduling policies: in which order the waiting queue is considered for admission.

    policy.order(waiting: list[Req], cache) -> list[Req]

FIFO keeps arrival order. Cache-aware (SGLang's "longest prefix match") puts requests
whose prompts share the longest cached prefix first, so they run while that prefix is
still in the cache; with a very long queue the matching costs more than it saves and
it falls back to FIFO, as SGLang does.
"""
from __future__ import annotations

CACHE_AWARE_MAX_QUEUE = 128


class FifoPolicy:
    name = "fifo"

    def order(self, waiting, cache):
        return list(waiting)


class CacheAwarePolicy:
    name = "cache_aware"

    def order(self, waiting, cache):
        if len(waiting) > CACHE_AWARE_MAX_QUEUE:
            return list(waiting)
        # sorted() is stable: equal matches keep their arrival order.
        matched = {id(r): len(cache.match_prefix(r.all_ids)[0]) for r in waiting}
        return sorted(waiting, key=lambda r: -matched[id(r)])


def make_policy(name: str):
    policies = {"fifo": FifoPolicy, "cache_aware": CacheAwarePolicy, "lpm": CacheAwarePolicy}
    if name not in policies:
        raise ValueError(f"schedule_policy must be 'fifo' or 'cache_aware', got {name!r}")
    return policies[name]()
