"""Stage 4 property test: random insert / match / lock / unlock / evict / reset sequences
against a reference model, with `check_integrity` (every pool page free xor cached) after
every step.

The reference is a dict {cached prefix (a tuple, whole pages) -> slots of its last page}:
a radix tree is exactly a prefix-closed set of such prefixes, stored compactly. Matching
is "longest prefix in the dict", inserting adds every prefix of the new sequence. Which
leaves an eviction picks is the tree's business (LRU, unit-tested); the model checks that
it only removed unlocked leaves, freed what it says, and freed enough.
"""
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from stage2_runner.kv_cache import SlotAllocator
from stage4_radix.radix_cache import RadixCache

pytestmark = pytest.mark.stage4


def tree_prefixes(cache: RadixCache) -> dict[tuple, tuple]:
    """What the tree holds, in the model's form."""
    P, out, stack = cache.page_size, {}, [(cache.root, ())]
    while stack:
        node, prefix = stack.pop()
        for child in node.children.values():
            for j in range(0, len(child.key), P):
                out[prefix + tuple(child.key[:j + P])] = tuple(child.value[j:j + P].tolist())
            stack.append((child, prefix + tuple(child.key)))
    return out


class RadixMachine(RuleBasedStateMachine):
    page_size = 1

    def __init__(self):
        super().__init__()
        P = self.page_size
        self.cache = RadixCache(SlotAllocator(24 * P, P), P)
        self.model: dict[tuple, tuple] = {}
        self.locked: list[tuple] = []          # (node, matched prefix) per outstanding lock
        self.history: list[list[int]] = [[]]

    # ---- helpers --------------------------------------------------------------------
    def draw_tokens(self, data) -> list[int]:
        """A sequence that often shares a prefix with an earlier one, cut at any token."""
        base = data.draw(st.sampled_from(self.history))
        cut = data.draw(st.integers(0, len(base)))
        tail = data.draw(st.lists(st.integers(0, 2), max_size=4 * self.page_size + 2))
        tokens = base[:cut] + tail
        self.history.append(tokens)
        return tokens

    def expected_match(self, tokens: list[int]) -> list[int]:
        P, slots, k = self.page_size, [], 1
        while k * P <= len(tokens) and tuple(tokens[:k * P]) in self.model:
            slots += self.model[tuple(tokens[:k * P])]
            k += 1
        return slots

    def locked_prefixes(self) -> set[tuple]:
        P = self.page_size
        return {p[:j] for _, p in self.locked for j in range(P, len(p) + 1, P)}

    # ---- rules ----------------------------------------------------------------------
    @rule(data=st.data())
    def match(self, data):
        tokens = self.draw_tokens(data)
        slots, _ = self.cache.match_prefix(tokens)
        assert slots.tolist() == self.expected_match(tokens)

    @rule(data=st.data())
    def insert(self, data):
        P = self.page_size
        tokens = self.draw_tokens(data)
        tokens = tokens[:len(tokens) // P * P]
        need = len(tokens) - self.cache.allocator.available_size()
        if need > 0:
            self.cache.evict(need)
            self.sync_after_evict()
        if self.cache.allocator.available_size() < len(tokens):
            return
        slots = self.cache.allocator.alloc(len(tokens))
        n = self.cache.insert(tokens, slots)
        assert n == len(self.expected_match(tokens))
        self.cache.allocator.free(slots[:n])           # our duplicates
        for j in range(n + P, len(tokens) + 1, P):
            self.model[tuple(tokens[:j])] = tuple(slots[j - P:j].tolist())

    @rule(data=st.data())
    def lock(self, data):
        tokens = self.draw_tokens(data)
        slots, node = self.cache.match_prefix(tokens)
        self.cache.lock(node)
        self.locked.append((node, tuple(tokens[:len(slots)])))

    @precondition(lambda self: self.locked)
    @rule(data=st.data())
    def unlock(self, data):
        i = data.draw(st.integers(0, len(self.locked) - 1))
        node, _ = self.locked.pop(i)
        self.cache.unlock(node)

    @rule(num=st.integers(0, 30))
    def evict(self, num):
        before = self.cache.evictable_size()
        freed = self.cache.evict(num)
        removed = self.sync_after_evict()
        assert freed == self.page_size * len(removed)
        assert freed >= min(num, before)
        assert freed < num + before or self.cache.evictable_size() == 0

    @precondition(lambda self: not self.locked)
    @rule()
    def reset(self):
        self.cache.reset()
        self.model.clear()
        assert self.cache.allocator.available_size() == self.cache.allocator.size

    def sync_after_evict(self) -> set[tuple]:
        now = tree_prefixes(self.cache)
        assert all(self.model.get(k) == v for k, v in now.items()), "eviction changed or invented entries"
        removed = set(self.model) - set(now)
        assert not removed & self.locked_prefixes(), "a locked prefix was evicted"
        self.model = now
        return removed

    # ---- after every step -----------------------------------------------------------
    @invariant()
    def consistent(self):
        P = self.page_size
        self.cache.check_integrity(self.cache.allocator.size)
        assert tree_prefixes(self.cache) == self.model
        assert self.cache.protected_size() == P * len(self.locked_prefixes())
        assert self.cache.evictable_size() + self.cache.protected_size() == P * len(self.model)


SETTINGS = settings(max_examples=100, stateful_step_count=30, deadline=None)


@SETTINGS
class RadixPage1(RadixMachine):
    page_size = 1


@SETTINGS
class RadixPage4(RadixMachine):
    page_size = 4


TestRadixPage1 = RadixPage1.TestCase
TestRadixPage4 = RadixPage4.TestCase
