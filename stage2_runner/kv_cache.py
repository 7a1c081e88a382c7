"""Paged KV cache: a token-slot pool per layer, a page allocator and `req_to_token`.

    k_buffers[layer], v_buffers[layer]: [num_slots, kv_heads, head_dim]
    req_to_token: [max_requests, max_context] int32, (request row, position) -> slot

Slots are handed out in pages of `page_size` consecutive slots. A page is owned by
exactly one party at a time (the free list, the prefix cache, or one running request),
which is what makes the leak invariant `free + cached + running == pool size` checkable.
Running out of pages raises `OutOfSlots`; the scheduler catches it and retracts.
"""
from __future__ import annotations

import torch


class OutOfSlots(RuntimeError):
    """Not enough free KV slots for an allocation (recoverable: evict or retract)."""


class SlotAllocator:
    def __init__(self, num_slots: int, page_size: int = 1, device: str | torch.device = "cpu"):
        assert num_slots >= page_size >= 1
        self.page_size = page_size
        self.num_pages = num_slots // page_size
        self.size = self.num_pages * page_size      # usable slots, a whole number of pages
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        # A plain Python list of page ids: pops/pushes are O(1) and never sync the GPU.
        self._free_pages = list(range(self.num_pages - 1, -1, -1))

    def available_size(self) -> int:
        """Free slots (whole pages only)."""
        return len(self._free_pages) * self.page_size

    def alloc_pages(self, n: int) -> list[int]:
        if n > len(self._free_pages):
            raise OutOfSlots(f"need {n} pages, {len(self._free_pages)} free")
        return [self._free_pages.pop() for _ in range(n)]

    def alloc(self, n: int) -> torch.Tensor:
        """n fresh slots starting on a page boundary: [n] int64."""
        return self.alloc_extend(0, -1, n)

    def alloc_extend(self, prev_len: int, last_slot: int, n: int) -> torch.Tensor:
        """Slots for positions prev_len .. prev_len+n-1 of one sequence whose position
        prev_len-1 sits in `last_slot`. The partly filled last page is used first."""
        P = self.page_size
        room = (P - prev_len % P) % P if prev_len > 0 else 0   # free slots left in the last page
        take = min(room, n)
        head = list(range(last_slot + 1, last_slot + 1 + take))
        pages = self.alloc_pages(-(-(n - take) // P))
        tail = [p * P + i for p in pages for i in range(P)][: n - take]
        return torch.tensor(head + tail, dtype=torch.int64)

    def free(self, slots: torch.Tensor | list[int]) -> None:
        """Return the pages of these slots. The caller must own those pages entirely."""
        if isinstance(slots, torch.Tensor):
            slots = slots.tolist()
        if not slots:
            return
        pages = sorted({s // self.page_size for s in slots})
        self._free_pages.extend(pages)

    def pages_of(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)


class KVPool:
    """The per-layer K/V buffers plus the request -> token-slot table."""

    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device, page_size: int = 1,
                 max_requests: int = 256, max_context: int = 4096):
        self.allocator = SlotAllocator(num_slots, page_size, device)
        n = self.allocator.size
        # One extra slot at index n: a scratch target for padded tokens (CUDA-graph padding).
        self.k_buffers = [torch.zeros(n + 1, kv_heads, head_dim, dtype=dtype, device=device)
                          for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(n + 1, kv_heads, head_dim, dtype=dtype, device=device)
                          for _ in range(num_layers)]
        self.req_to_token = torch.zeros(max_requests, max_context, dtype=torch.int32, device=device)
        self.free_rows = list(range(max_requests - 1, -1, -1))
        self.max_context = max_context
        self.size = n

    def alloc_row(self) -> int:
        if not self.free_rows:
            raise OutOfSlots("no free req_to_token row (too many running requests)")
        return self.free_rows.pop()

    def free_row(self, row: int) -> None:
        self.free_rows.append(row)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new K/V: slots [T], k/v [T, kv_heads, head_dim]."""
        self.k_buffers[layer][slots] = k.to(self.k_buffers[layer].dtype)
        self.v_buffers[layer][slots] = v.to(self.v_buffers[layer].dtype)

    @staticmethod
    def bytes_per_slot(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
