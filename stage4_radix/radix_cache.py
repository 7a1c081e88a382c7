"""The radix-tree prefix cache: stage 3's `PrefixCache` protocol, implemented for real.

Every node holds one edge of the tree: a run of token ids `key` and the KV slots `value`
([len(key)] int64) where those tokens' K/V live. The tokens on the path root..node spell a
cached prefix; the values on that path, concatenated, are its KV slots.

    match_prefix(tokens) -> (slots [n], node)  longest cached prefix, n % page_size == 0;
                                               a partly matched node is split so `node` ends at n
    insert(tokens, slots) -> n                 tokens[:n] were cached already: the caller keeps
                                               (and frees) slots[:n]; the cache owns slots[n:]
    lock(node) / unlock(node)                  lock_ref +/- 1 on every node of root..node
    evict(num_tokens) -> freed                 free unlocked leaves, least recently used first
    evictable_size() / protected_size()        cached slots in unlocked / locked nodes
    reset()                                    free everything (only when nothing is locked)
    check_integrity(pool_size, running_slots)  walk the tree and assert every invariant

Pages: with page_size P > 1, keys are compared page by page and every key is a whole
number of pages, so the cache always owns whole pages of the pool (what the allocator
frees). Children are indexed by their first page of tokens.
"""
from __future__ import annotations

import heapq
import itertools

import torch


class Node:
    __slots__ = ("key", "value", "parent", "children", "lock_ref", "last_access", "id")
    _ids = itertools.count()

    def __init__(self, key: list[int], value: torch.Tensor, parent: Node | None):
        self.key, self.value, self.parent = key, value, parent
        self.children: dict[tuple[int, ...], Node] = {}   # first page of the child's key -> child
        self.lock_ref = 0          # how many locks pass through this node (running requests)
        self.last_access = 0       # LRU clock value of the last match/insert through here
        self.id = next(Node._ids)  # tie-breaker in the eviction heap


class RadixCache:
    def __init__(self, allocator, page_size: int = 1):
        self.allocator, self.page_size = allocator, page_size
        self._clock = itertools.count(1)    # a counter, not wall time: deterministic LRU order
        self._new_root()

    def _new_root(self) -> None:
        self.root = Node([], torch.empty(0, dtype=torch.int64), None)
        self._evictable = self._protected = 0

    # ---- protocol -------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int]) -> tuple[torch.Tensor, Node]:
        """Longest cached prefix of token_ids (whole pages): its slots [n] and its last node."""
        tokens = list(token_ids[: len(token_ids) // self.page_size * self.page_size])
        node, i, values = self.root, 0, []
        node.last_access = next(self._clock)
        while i < len(tokens) and (child := self._descend(node, tokens, i)) is not None:
            node, i = child, i + len(child.key)
            values.append(child.value)
        slots = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
        return slots, node

    def insert(self, token_ids: list[int], slots: torch.Tensor) -> int:
        """Cache tokens -> slots; returns n, the length that was cached already (slots[:n] not taken)."""
        P, tokens = self.page_size, list(token_ids)
        assert len(tokens) % P == 0, f"insert: {len(tokens)} tokens is not a whole number of pages ({P})"
        assert len(slots) == len(tokens), f"insert: {len(tokens)} tokens but {len(slots)} slots"
        node, i = self.root, 0
        node.last_access = next(self._clock)
        while i < len(tokens) and (child := self._descend(node, tokens, i)) is not None:
            node, i = child, i + len(child.key)
        if i < len(tokens):                     # the rest is new: one new leaf owns slots[i:]
            # clone: slots is often a view into a request's tensor; the tree keeps its own.
            leaf = Node(tokens[i:], slots[i:].to(torch.int64).clone(), node)
            leaf.last_access = next(self._clock)
            node.children[tuple(leaf.key[:P])] = leaf
            self._evictable += len(leaf.key)
        return i

    def lock(self, node: Node | None) -> None:
        while node is not None and node is not self.root:
            if node.lock_ref == 0:                          # unlocked -> locked: move its slots
                self._evictable -= len(node.value)
                self._protected += len(node.value)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node | None) -> None:
        while node is not None and node is not self.root:
            assert node.lock_ref > 0, f"unlock of a node that is not locked: {self._label(node)}"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.value)
                self._evictable += len(node.value)
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Free unlocked leaves, oldest first, until num_tokens slots are freed (or none is left)."""
        heap = [(n.last_access, n.id, n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            self.allocator.free(leaf.value)
            freed += len(leaf.value)
            self._evictable -= len(leaf.value)
            parent = leaf.parent
            del parent.children[tuple(leaf.key[:self.page_size])]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.id, parent))   # a new leaf
        return freed

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def reset(self) -> None:
        assert self._protected == 0, f"reset() while {self._protected} cached slots are locked by requests"
        for node in self._nodes():
            self.allocator.free(node.value)
        self._new_root()

    # ---- tree surgery ---------------------------------------------------------------
    def _descend(self, node: Node, tokens: list[int], i: int) -> Node | None:
        """The child of node that continues tokens[i:], split so that it ends within the
        match (its whole key matches); None if no child starts with the next page."""
        child = node.children.get(tuple(tokens[i:i + self.page_size]))
        if child is None:
            return None
        m = self._common_len(child.key, tokens, i)          # >= one page: the first page matched
        if m < len(child.key):
            child = self._split(child, m)
        child.last_access = next(self._clock)
        return child

    def _common_len(self, key: list[int], tokens: list[int], start: int) -> int:
        """Length of the common prefix of key and tokens[start:], in whole pages."""
        if key == tokens[start:start + len(key)]:           # the usual case, compared in C
            return len(key)
        P, n, m = self.page_size, min(len(key), len(tokens) - start), 0
        while m + P <= n and key[m:m + P] == tokens[start + m:start + m + P]:
            m += P
        return m

    def _split(self, child: Node, m: int) -> Node:
        """parent -> child  becomes  parent -> new (key[:m]) -> child (key[m:]); returns new."""
        P = self.page_size
        new = Node(child.key[:m], child.value[:m], child.parent)
        # Every lock through child also passes through new, and new is touched when child is.
        new.lock_ref, new.last_access = child.lock_ref, child.last_access
        child.parent.children[tuple(new.key[:P])] = new
        child.key, child.value, child.parent = child.key[m:], child.value[m:], new
        new.children[tuple(child.key[:P])] = child
        return new

    def _nodes(self):
        """Every node except the root (iterative: a long chain must not hit the recursion limit)."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # ---- checking and drawing -------------------------------------------------------
    def check_integrity(self, pool_size: int | None = None, running_slots=()) -> None:
        """Assert the tree is consistent. With pool_size (and the slots that running requests
        own, excluding their cached prefix), also assert every page of the pool is exactly one
        of: free, cached, running."""
        P, seen, sizes = self.page_size, set(), [0, 0]     # sizes: [evictable, protected]
        for node in [self.root, *self._nodes()]:
            for k, child in node.children.items():
                _check(child.parent is node, f"{self._label(child)}: wrong parent pointer")
                _check(k == tuple(child.key[:P]), f"{self._label(child)}: indexed under {k}")
            _check(sum(c.lock_ref for c in node.children.values()) <= node.lock_ref or node is self.root,
                   f"{self._label(node)}: lock_ref below the sum of its children's")
            if node is self.root:
                continue
            n = len(node.key)
            _check(n == len(node.value) and n > 0 and n % P == 0,
                   f"{self._label(node)}: {n} tokens, {len(node.value)} slots, page_size {P}")
            _check(node.lock_ref >= 0, f"{self._label(node)}: negative lock_ref")
            pages = node.value.reshape(-1, P)            # whole, aligned pages: s, s+1, ..., s+P-1
            _check(bool((pages[:, 0] % P == 0).all() and (pages - pages[:, :1] == torch.arange(P)).all()),
                   f"{self._label(node)}: slots are not whole pages")
            slots = set(node.value.tolist())
            _check(len(slots) == n and not slots & seen, f"{self._label(node)}: a slot is held twice")
            seen |= slots
            sizes[node.lock_ref > 0] += n
        _check(sizes == [self._evictable, self._protected],
               f"counters evictable/protected {self._evictable}/{self._protected}, tree has {sizes}")
        if pool_size is not None:
            self._check_partition(pool_size, {s // P for s in seen}, running_slots)

    def _check_partition(self, pool_size: int, cached: set[int], running_slots) -> None:
        P = self.page_size
        free = list(self.allocator._free_pages)        # stage 2 keeps page ids; read-only peek
        running = [p for t in running_slots for p in {int(s) // P for s in _as_list(t)}]   # per request
        _check(len(set(free)) == len(free), "a page is on the free list twice")
        _check(len(set(running)) == len(running), "two running requests own the same page")
        owners = [set(free), cached, set(running)]
        for a, b, what in [(0, 1, "free and cached"), (0, 2, "free and running"), (1, 2, "cached and running")]:
            _check(not owners[a] & owners[b], f"pages {sorted(owners[a] & owners[b])[:8]} are both {what}")
        lost = set(range(pool_size // P)) - set().union(*owners)
        _check(not lost, f"KV leak: pages {sorted(lost)[:8]} are neither free, cached nor running")

    def _label(self, node: Node, decode=None, width: int = 8) -> str:
        if node is self.root:
            return f"root (evictable {self._evictable}, protected {self._protected})"
        toks = decode(node.key) if decode else " ".join(map(str, node.key[:width])) + \
            (f" ... ({len(node.key)} tokens)" if len(node.key) > width else "")
        s = node.value.tolist()
        where = f"{s[0]}..{s[-1]}" if len(s) > 1 and s == list(range(s[0], s[0] + len(s))) else \
            " ".join(map(str, s[:width])) + (" ..." if len(s) > width else "")
        return f"[{toks}] slots {where}" + (f" lock {node.lock_ref}" if node.lock_ref else "")

    def pretty(self, decode=None) -> str:
        """Draw the tree, one node per line. decode: optional tokens -> str (e.g. tokenizer.decode)."""
        lines, stack = [], [(self.root, "", "")]      # (node, its line's prefix, its children's indent)
        while stack:
            node, head, indent = stack.pop()
            lines.append(head + self._label(node, decode))
            kids = list(node.children.values())
            for i, child in reversed(list(enumerate(kids))):   # reversed: the first child pops first
                last = i == len(kids) - 1
                stack.append((child, indent + ("└── " if last else "├── "), indent + ("    " if last else "│   ")))
        return "\n".join(lines)

    __str__ = pretty


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(f"RadixCache integrity: {message}")


def _as_list(slots) -> list[int]:
    return slots.tolist() if isinstance(slots, torch.Tensor) else list(slots)
