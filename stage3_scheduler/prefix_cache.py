"""The prefix-cache protocol (docs/design.md#the-seams) and the no-op cache used when caching is off.

A prefix cache owns KV pages of token prefixes that finished (or partly prefilled)
requests left behind. The scheduler talks to it only through this protocol:

    match_prefix(tokens)        -> (slots [n] int64, node)  longest cached prefix, n % page_size == 0
    insert(tokens, slots)       -> n: the cache did NOT take slots[:n] (already cached there, or
                                   it keeps nothing); it owns slots[n:] from now on. The caller
                                   frees the slots it owned among slots[:n].
    lock(node) / unlock(node)   pin / unpin the path root..node against eviction
    evict(num_tokens)           free at least num_tokens unlocked slots (LRU), return the number freed
    evictable_size()            slots held by the cache that nobody has locked
    protected_size()            slots held by the cache that are locked
    reset()                     drop everything (only when no request runs)

Stage 4's `RadixCache` implements it for real; stage 3 ships `NoPrefixCache`.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch


class PrefixCache(Protocol):
    page_size: int

    def match_prefix(self, token_ids: list[int]) -> tuple[torch.Tensor, Any]: ...
    def insert(self, token_ids: list[int], slots: torch.Tensor) -> int: ...
    def lock(self, node: Any) -> None: ...
    def unlock(self, node: Any) -> None: ...
    def evict(self, num_tokens: int) -> int: ...
    def evictable_size(self) -> int: ...
    def protected_size(self) -> int: ...
    def reset(self) -> None: ...


class NoPrefixCache:
    """Caches nothing: every prompt is computed in full, finished requests free all slots."""

    def __init__(self, allocator=None, page_size: int = 1):
        self.allocator = allocator
        self.page_size = page_size

    def match_prefix(self, token_ids: list[int]) -> tuple[torch.Tensor, None]:
        return torch.empty(0, dtype=torch.int64), None

    def insert(self, token_ids: list[int], slots: torch.Tensor) -> int:
        # Keeps nothing: the caller still owns (and frees) every slot.
        return len(token_ids)

    def lock(self, node) -> None:
        pass

    def unlock(self, node) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def reset(self) -> None:
        pass
