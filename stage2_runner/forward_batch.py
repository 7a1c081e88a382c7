"""One forward step's worth of tokens and the metadata attention needs.

Two modes (SGLang's names):
  extend  several requests each add k_i >= 1 new tokens on top of p_i tokens already in
          the pool (p_i = 0 is a plain prefill; p_i > 0 is a cached prefix or an earlier
          chunk). Token layout: [r0: k_0 tokens | r1: k_1 tokens | ...], T = sum k_i.
  decode  every request adds exactly one token: T = B.

The caller has already allocated `out_cache_loc` (the slots the new tokens' K/V go to)
and written them into `req_to_token[row, p_i : p_i + k_i]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    mode: str                      # "extend" | "decode"
    input_ids: torch.Tensor        # [T]
    positions: torch.Tensor        # [T]
    out_cache_loc: torch.Tensor    # [T] slots for the new K/V
    req_pool_indices: torch.Tensor  # [B] rows of req_to_token
    seq_lens: torch.Tensor         # [B] int32, KV length after this step (p_i + k_i)
    prefix_lens: torch.Tensor      # [B] int32, p_i
    extend_lens: torch.Tensor      # [B] int32, k_i
    extend_start_loc: torch.Tensor  # [B] int32, offset of request i's first token in T
    # Host copies: the torch backend loops over requests with them; the triton decode
    # path never reads them (so decode stays graph-capturable).
    seq_lens_cpu: list[int]
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    # Prompt logprobs (stage 3's prompt_logprobs.py): rows of T whose hidden states the
    # runner keeps in `kept_hidden` [N, hidden]. None for plain batches: they pay nothing.
    hidden_rows: torch.Tensor | None = None
    kept_hidden: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode(self) -> bool:
        return self.mode == "decode"

    @property
    def max_extend_len(self) -> int:
        return max(self.extend_lens_cpu)

    @property
    def last_token_index(self) -> torch.Tensor:
        """[B] index in T of each request's last new token (whose logits we sample)."""
        return self.extend_start_loc.long() + self.extend_lens.long() - 1


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host tensor -> device without a host sync. A plain `.to("cuda")` of pageable memory
    waits for the GPU to drain (PyTorch syncs the stream after the copy), which would stall
    the overlap scheduler; a pinned staging copy + non_blocking does not. PyTorch's pinned
    allocator keeps the staging buffer alive until the copy has run."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def make_batch(rows: list[int], prefix_lens: list[int], new_tokens: list[list[int]],
               out_cache_loc: torch.Tensor, device) -> ForwardBatch:
    """Build an extend (or, if every request adds one token, decode) batch. All integer
    fields travel to the device in ONE non-blocking copy, then are split into views.

    Every view starts 16-byte aligned: Triton compiles a kernel separately for aligned and
    unaligned pointer arguments, so views at offsets that depend on T and B would compile
    new kernel variants in the middle of serving (a ~1 s stall for whoever is waiting)."""
    ext = [len(t) for t in new_tokens]
    seq = [p + k for p, k in zip(prefix_lens, ext)]
    starts = [0]
    for k in ext[:-1]:
        starts.append(starts[-1] + k)
    positions = [pos for p, k in zip(prefix_lens, ext) for pos in range(p, p + k)]
    T, B = len(positions), len(rows)
    Tp, Bp = _round_up(T, 2), _round_up(B, 4)        # int64 segments of Tp, int64/int32 rows of Bp
    tpad, bpad = [0] * (Tp - T), [0] * (Bp - B)
    host = torch.cat([torch.tensor([t for ts in new_tokens for t in ts] + tpad + positions + tpad, dtype=torch.int64),
                      out_cache_loc.to("cpu", torch.int64), torch.zeros(Tp - T, dtype=torch.int64),
                      torch.tensor([v for field in (rows, seq, prefix_lens, ext, starts) for v in (*field, *bpad)],
                                   dtype=torch.int64)])
    dev = to_device(host, device)
    ids, pos, loc = dev[:T], dev[Tp:Tp + T], dev[2 * Tp:2 * Tp + T]
    rest = dev[3 * Tp:].view(5, Bp)
    rest32 = rest[1:].to(torch.int32)                 # seq, prefix, extend, start: [4, Bp] int32
    return ForwardBatch(
        mode="decode" if all(k == 1 for k in ext) else "extend",
        input_ids=ids, positions=pos, out_cache_loc=loc, req_pool_indices=rest[0, :B],
        seq_lens=rest32[0, :B], prefix_lens=rest32[1, :B], extend_lens=rest32[2, :B],
        extend_start_loc=rest32[3, :B],
        seq_lens_cpu=seq, prefix_lens_cpu=list(prefix_lens), extend_lens_cpu=ext)
