"""Who owns which KV slots of a request, and handing them over to the prefix cache.

A running request's slots are `req.slots` (a list of kv_len ints): the first `cached_len`
belong to the prefix cache (locked through `req.cache_node`, so they cannot be evicted
under it), the rest belong to the request. `req_to_token[req.row, :kv_len]` mirrors
`req.slots` on the device. The prefix cache speaks tensors; `_t` converts at that border.
"""
from __future__ import annotations

import torch

from stage2_runner.forward_batch import to_device
from stage2_runner.kv_cache import KVPool, OutOfSlots
from stage3_scheduler.prompt_logprobs import cache_limit
from stage3_scheduler.request import Req


def _t(slots: list[int]) -> torch.Tensor:
    return torch.tensor(slots, dtype=torch.int64)


def ensure_free(pool: KVPool, cache, num_slots: int) -> None:
    """Evict from the cache until `num_slots` are free, else raise OutOfSlots."""
    short = num_slots - pool.allocator.available_size()
    if short > 0:
        cache.evict(short)
    if pool.allocator.available_size() < num_slots:
        raise OutOfSlots(f"need {num_slots} slots, {pool.allocator.available_size()} free after eviction")


def attach_prefix(req: Req, pool: KVPool, cache) -> None:
    """Admission: take the longest cached prefix (locked) and a req_to_token row."""
    slots, node = cache.match_prefix(req.all_ids)
    # Always leave at least one token to compute: its logits give the next token. Prompt
    # positions that still need logprobs need their hidden states: no cache for them.
    keep = min(len(slots), min(req.seq_len - 1, cache_limit(req)) // cache.page_size * cache.page_size)
    if keep < len(slots):
        slots, node = cache.match_prefix(req.all_ids[:keep])
    cache.lock(node)
    req.row = pool.alloc_row()
    req.slots, req.cache_node = slots.tolist(), node
    req.cached_len = req.kv_len = len(slots)
    if len(slots):
        pool.req_to_token[req.row, :len(slots)] = to_device(slots.to(torch.int32), pool.req_to_token.device)


def grow(req: Req, pool: KVPool, cache, n: int) -> torch.Tensor:
    """Slots for the next n tokens of req (evicting from the cache if needed)."""
    need = pool.allocator.pages_of(req.kv_len + n) - pool.allocator.pages_of(req.kv_len)
    ensure_free(pool, cache, need * pool.allocator.page_size)
    last = req.slots[-1] if req.kv_len else -1
    new = pool.allocator.alloc_extend(req.kv_len, last, n)
    pool.req_to_token[req.row, req.kv_len:req.kv_len + n] = to_device(new.to(torch.int32), pool.req_to_token.device)
    req.slots += new.tolist()
    return new


def grow_decode(reqs: list[Req], pool: KVPool, cache) -> torch.Tensor:
    """One slot each for a decode step, allocated for the whole batch at once: [B] int64.
    A request whose last page is full gets a fresh page; the others take the next slot of
    their last page. The caller writes req_to_token (one device op for the batch)."""
    P = pool.allocator.page_size
    fresh = [r.kv_len % P == 0 for r in reqs]
    ensure_free(pool, cache, sum(fresh) * P)
    pages = iter(pool.allocator.alloc_pages(sum(fresh)))
    locs = [next(pages) * P if f else r.slots[-1] + 1 for r, f in zip(reqs, fresh)]
    for r, loc in zip(reqs, locs):
        r.slots.append(loc)
    return torch.tensor(locs, dtype=torch.int64)


def cache_prefix(req: Req, pool: KVPool, cache) -> None:
    """Mid-prefill (chunked): hand the computed, page-aligned prefix to the cache and
    re-point the request at the cache's copy, so other requests can share it."""
    aligned = req.kv_len // cache.page_size * cache.page_size
    if aligned <= req.cached_len:
        return
    n = cache.insert(req.all_ids[:aligned], _t(req.slots[:aligned]))
    if n >= aligned:                      # a cache that keeps nothing (NoPrefixCache)
        return
    pool.allocator.free(req.slots[req.cached_len:n])      # our duplicates of cached tokens
    slots, node = cache.match_prefix(req.all_ids[:aligned])
    assert len(slots) == aligned, "an inserted prefix must match in full"
    cache.lock(node)
    cache.unlock(req.cache_node)
    req.slots = slots.tolist() + req.slots[aligned:]
    pool.req_to_token[req.row, :aligned] = to_device(slots.to(torch.int32), pool.req_to_token.device)
    req.cached_len, req.cache_node = aligned, node


def release(req: Req, pool: KVPool, cache, keep_in_cache: bool) -> None:
    """Finished (keep_in_cache) or retracted/aborted: give every slot back to its owner."""
    own_from = req.cached_len
    if keep_in_cache and req.kv_len:
        aligned = req.kv_len // cache.page_size * cache.page_size
        n = cache.insert(req.all_ids[:aligned], _t(req.slots[:aligned]))
        # The cache took slots[max(n, cached):aligned]; we free our duplicates and the tail.
        pool.allocator.free(req.slots[req.cached_len:max(n, req.cached_len)])
        own_from = max(aligned, req.cached_len)
    pool.allocator.free(req.slots[own_from:req.kv_len])
    cache.unlock(req.cache_node)
    pool.free_row(req.row)
    req.row, req.kv_len, req.cached_len, req.cache_node = -1, 0, 0, None
    req.slots = []
