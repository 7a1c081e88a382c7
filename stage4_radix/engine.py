"""The stage-4 Engine: stage 3's offline Engine with the radix-tree prefix cache plugged in.

    Engine(model="demo", **options).generate(...)      same API and options as stage 3;
    disable_radix_cache=True                          falls back to stage 3's NoPrefixCache

Nothing else changes: the stage-3 scheduler already matches prefixes at admission, counts
evictable cache slots as available memory, evicts before allocating, hands finished (and
partly prefilled) prefixes to the cache, and reports `cached_tokens`. With `NoPrefixCache`
those paths were no-ops; here they do real work.
"""
from __future__ import annotations

import torch

from stage3_scheduler.engine import Engine as Stage3Engine
from stage4_radix.radix_cache import RadixCache


class Engine(Stage3Engine):
    def make_cache(self):
        if self.disable_radix_cache:
            return super().make_cache()
        allocator = self.runner.pool.allocator
        return RadixCache(allocator, allocator.page_size)

    def check_integrity(self) -> None:
        """The leak invariant, twice: by counting (scheduler) and page by page (tree walk)."""
        sched = self.scheduler
        sched.check_invariant()
        if isinstance(self.cache, RadixCache):
            # A running request owns its slots after the cached prefix (cached_len is page-aligned).
            owned = [torch.tensor(r.slots[r.cached_len:], dtype=torch.int64) for r in sched.running]
            self.cache.check_integrity(sched.pool.size, owned)
