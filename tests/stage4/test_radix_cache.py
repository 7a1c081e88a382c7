"""Stage 4 unit tests: insert, match, split, lock/unlock, LRU eviction, reset, integrity check.

Every test runs for page_size 1 and 16. Token sequences are written as pages: `seq(P, 1, 2)`
is page "1" then page "2" (P tokens each), so the same test reads the same for every P.
"""
import pytest
import torch

from stage2_runner.kv_cache import SlotAllocator
from stage4_radix.radix_cache import RadixCache

pytestmark = pytest.mark.stage4


def seq(P: int, *pages: int) -> list[int]:
    """Page k is the P tokens 100k, 100k+1, ...: distinct pages never share a token."""
    return [100 * k + j for k in pages for j in range(P)]


@pytest.fixture(params=[1, 16], ids=["page1", "page16"])
def cache(request):
    P = request.param
    return RadixCache(SlotAllocator(64 * P, P), P)


def put(cache: RadixCache, tokens: list[int]) -> torch.Tensor:
    """What a finished request does: allocate, insert, free the duplicates the cache did not take."""
    slots = cache.allocator.alloc(len(tokens))
    n = cache.insert(tokens, slots)
    cache.allocator.free(slots[:n])
    return slots


def check(cache: RadixCache, running=()) -> None:
    cache.check_integrity(cache.allocator.size, running)


def test_empty_cache_matches_nothing(cache):
    slots, node = cache.match_prefix(seq(cache.page_size, 1, 2))
    assert len(slots) == 0 and node is cache.root
    assert cache.match_prefix([])[0].numel() == 0
    cache.lock(node)                        # locking the root is a no-op
    cache.unlock(None)
    assert cache.evictable_size() == cache.protected_size() == 0
    check(cache)


def test_insert_then_match_returns_the_same_slots(cache):
    P = cache.page_size
    slots = put(cache, seq(P, 1, 2, 3))
    assert cache.evictable_size() == 3 * P
    got, node = cache.match_prefix(seq(P, 1, 2, 3, 4))     # longer query: the cached part
    assert torch.equal(got, slots) and node.key == seq(P, 1, 2, 3)
    got, _ = cache.match_prefix(seq(P, 1, 2, 3)[:-1])      # one token short: a page less (P > 1)
    assert len(got) == (3 * P - 1) // P * P
    check(cache)


def test_insert_returns_the_already_cached_length(cache):
    P = cache.page_size
    first = put(cache, seq(P, 1, 2))
    second = cache.allocator.alloc(3 * P)
    n = cache.insert(seq(P, 1, 2, 5), second)
    assert n == 2 * P                                   # the cache kept its own copy of pages 1, 2
    check(cache, [second[:n]])                          # ... so the caller still owns these
    cache.allocator.free(second[:n])
    got, _ = cache.match_prefix(seq(P, 1, 2, 5))
    assert torch.equal(got, torch.cat([first, second[2 * P:]]))
    assert cache.insert(seq(P, 1, 2), first) == 2 * P   # all cached: takes nothing
    check(cache)


def test_partial_match_splits_the_node(cache):
    P = cache.page_size
    slots = put(cache, seq(P, 1, 2, 3))
    got, node = cache.match_prefix(seq(P, 1, 7))
    assert torch.equal(got, slots[:P]) and node.key == seq(P, 1)
    assert [c.key for c in node.children.values()] == [seq(P, 2, 3)]
    put(cache, seq(P, 1, 7))                            # a sibling under the split point
    assert len(cache.root.children) == 1 and len(node.children) == 2
    assert cache.evictable_size() == 4 * P
    check(cache)


def test_keys_are_compared_page_by_page():
    P = 4
    cache = RadixCache(SlotAllocator(64, P), P)
    put(cache, [1, 2, 3, 4, 5, 6, 7, 8])
    got, _ = cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 9])   # 7 tokens agree, one page matches
    assert len(got) == 4
    assert cache.insert([1, 2, 3, 4, 5, 6, 7, 9], cache.allocator.alloc(8)) == 4
    assert len(cache.root.children[(1, 2, 3, 4)].children) == 2
    with pytest.raises(AssertionError, match="whole number of pages"):
        cache.insert([1, 2, 3], torch.arange(3))


def test_lock_moves_slots_between_counters(cache):
    P = cache.page_size
    put(cache, seq(P, 1, 2))
    put(cache, seq(P, 1, 3))
    _, node = cache.match_prefix(seq(P, 1, 2))
    cache.lock(node)
    cache.lock(node)                                    # two requests on the same prefix
    assert (cache.protected_size(), cache.evictable_size()) == (2 * P, P)
    assert node.lock_ref == 2 and node.parent.lock_ref == 2
    cache.unlock(node)
    assert cache.protected_size() == 2 * P
    cache.unlock(node)
    assert (cache.protected_size(), cache.evictable_size()) == (0, 3 * P)
    with pytest.raises(AssertionError, match="not locked"):
        cache.unlock(node)


def test_split_of_a_locked_node_keeps_the_lock(cache):
    P = cache.page_size
    put(cache, seq(P, 1, 2, 3, 4))
    _, node = cache.match_prefix(seq(P, 1, 2, 3, 4))
    cache.lock(node)
    _, upper = cache.match_prefix(seq(P, 1, 2))         # splits the locked node
    assert upper.lock_ref == 1 and node.parent is upper
    assert cache.protected_size() == 4 * P
    check(cache)
    cache.unlock(node)                                  # walks through the new parent too
    assert (cache.protected_size(), cache.evictable_size()) == (0, 4 * P)
    check(cache)


def test_evict_frees_least_recently_used_leaves_first(cache):
    P = cache.page_size
    a, b, c = put(cache, seq(P, 1)), put(cache, seq(P, 2)), put(cache, seq(P, 3))
    cache.match_prefix(seq(P, 1))                       # touch a: b is now the oldest
    free0 = cache.allocator.available_size()
    assert cache.evict(1) == P                          # one whole leaf, even for 1 token
    assert len(cache.match_prefix(seq(P, 2))[0]) == 0
    assert cache.evict(P) == P
    assert len(cache.match_prefix(seq(P, 3))[0]) == 0
    assert torch.equal(cache.match_prefix(seq(P, 1))[0], a)
    assert cache.allocator.available_size() == free0 + 2 * P
    check(cache)


def test_parent_becomes_a_leaf_and_is_evicted_after_its_children(cache):
    P = cache.page_size
    put(cache, seq(P, 1, 2))
    put(cache, seq(P, 1, 3))
    put(cache, seq(P, 9))
    cache.match_prefix(seq(P, 9))                       # 9 is the newest
    assert cache.evict(3 * P) == 3 * P                  # leaves 2, 3, then their parent 1
    assert list(cache.root.children) == [tuple(seq(P, 9))]
    check(cache)


def test_a_locked_node_is_never_evicted(cache):
    P = cache.page_size
    put(cache, seq(P, 1, 2))
    put(cache, seq(P, 1, 3))
    put(cache, seq(P, 4))
    slots, node = cache.match_prefix(seq(P, 1, 2))
    cache.lock(node)
    cache.match_prefix(seq(P, 4))                       # the locked path is the oldest
    assert cache.evict(10**9) == 2 * P                  # only 1+3's leaf and 4
    assert torch.equal(cache.match_prefix(seq(P, 1, 2))[0], slots)
    assert cache.evictable_size() == 0 and cache.protected_size() == 2 * P
    check(cache)
    cache.unlock(node)
    assert cache.evict(10**9) == 2 * P
    check(cache)
    assert cache.allocator.available_size() == cache.allocator.size


def test_reset_frees_everything_and_refuses_while_locked(cache):
    P = cache.page_size
    put(cache, seq(P, 1, 2))
    put(cache, seq(P, 3))
    _, node = cache.match_prefix(seq(P, 3))
    cache.lock(node)
    with pytest.raises(AssertionError, match="locked"):
        cache.reset()
    cache.unlock(node)
    cache.reset()
    assert cache.allocator.available_size() == cache.allocator.size
    assert not cache.root.children and cache.evictable_size() == 0
    check(cache)


def test_check_integrity_catches_corruption(cache):
    P = cache.page_size
    put(cache, seq(P, 1, 2))
    put(cache, seq(P, 1, 3))
    check(cache)
    cache._evictable += 1
    with pytest.raises(AssertionError, match="counters"):
        check(cache)
    cache._evictable -= 1
    leaf = cache.match_prefix(seq(P, 1, 3))[1]
    leaf.lock_ref = 1                                   # a lock that skipped its parent
    with pytest.raises(AssertionError, match="lock_ref"):
        check(cache)
    leaf.lock_ref = 0
    cache.allocator.alloc_pages(1)                      # a page nobody owns: a leak
    with pytest.raises(AssertionError, match="leak"):
        check(cache)
    saved = leaf.value
    leaf.value = cache.match_prefix(seq(P, 1))[0].clone()   # a slot held twice
    with pytest.raises(AssertionError, match="twice"):
        cache.check_integrity()
    leaf.value = saved


def test_pretty_draws_the_tree():
    cache = RadixCache(SlotAllocator(64, 1), 1)
    put(cache, [1, 2, 3, 4])
    put(cache, [1, 2, 7])
    _, node = cache.match_prefix([1, 2, 7])
    cache.lock(node)
    assert cache.pretty() == "\n".join([
        "root (evictable 2, protected 3)",
        "└── [1 2] slots 0..1 lock 1",
        "    ├── [3 4] slots 2..3",
        "    └── [7] slots 6 lock 1",
    ])
    assert str(cache) == cache.pretty()
