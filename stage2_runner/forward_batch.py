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


def make_batch(rows: list[int], prefix_lens: list[int], new_tokens: list[list[int]],
               out_cache_loc: torch.Tensor, device) -> ForwardBatch:
    """Build an extend (or, if every request adds one token, decode) batch."""
    ext = [len(t) for t in new_tokens]
    seq = [p + k for p, k in zip(prefix_lens, ext)]
    starts = [0]
    for k in ext[:-1]:
        starts.append(starts[-1] + k)
    positions = [pos for p, k in zip(prefix_lens, ext) for pos in range(p, p + k)]
    i32 = dict(dtype=torch.int32, device=device)
    return ForwardBatch(
        mode="decode" if all(k == 1 for k in ext) else "extend",
        input_ids=torch.tensor([t for ts in new_tokens for t in ts], dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        out_cache_loc=out_cache_loc.to(device),
        req_pool_indices=torch.tensor(rows, dtype=torch.int64, device=device),
        seq_lens=torch.tensor(seq, **i32), prefix_lens=torch.tensor(prefix_lens, **i32),
        extend_lens=torch.tensor(ext, **i32), extend_start_loc=torch.tensor(starts, **i32),
        seq_lens_cpu=seq, prefix_lens_cpu=list(prefix_lens), extend_lens_cpu=ext)
