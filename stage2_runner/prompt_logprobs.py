"""Logprobs of given tokens from hidden states, a block of rows at a time.

    block_logprobs(compute_logits, hidden [N, H], targets [N], vocab, top_k, token_ids [N, K] | None)
      -> RowLogprobs(logprobs [N], top_logprobs [N, top_k], top_ids [N, top_k], ids_logprobs [N, K])

Used for prompt (input) logprobs: row i is the hidden state at some prompt position p,
`targets[i]` the token at p + 1, and the answer is log softmax(lm_head(hidden))[target],
under the raw logits (no temperature, penalties or bias), as SGLang reports them.

Why blocks: a 32k-token prompt times Qwen's 151,936-token vocabulary is 19 GB of float32
logits. Each block of `rows_per_block(vocab)` rows (a few hundred MB at most) goes through
lm_head, log-softmax and the gathers, and only the small results are kept, so memory stays
bounded whatever the prompt length. Under tensor parallelism `compute_logits` all-gathers;
every rank runs the same blocks, so the collectives pair up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_BYTES = 256 << 20        # float32 logits + log-softmax of one block stay under this


@dataclass
class RowLogprobs:
    logprobs: torch.Tensor                    # [N] log p(target)
    top_logprobs: torch.Tensor | None = None  # [N, top_k], descending
    top_ids: torch.Tensor | None = None       # [N, top_k]
    ids_logprobs: torch.Tensor | None = None  # [N, K] log p of token_ids (-1 pads read id 0)

    def fields(self) -> tuple:
        return self.logprobs, self.top_logprobs, self.top_ids, self.ids_logprobs


def rows_per_block(vocab: int, budget: int = BLOCK_BYTES) -> int:
    return max(1, budget // (vocab * 4 * 2))      # logits and log-softmax, 4 bytes each


def block_logprobs(compute_logits, hidden: torch.Tensor, targets: torch.Tensor, vocab: int, top_k: int = 0,
                   token_ids: torch.Tensor | None = None, block_rows: int | None = None) -> RowLogprobs:
    """compute_logits: hidden [n, H] -> logits [n, V] float32 (the model's lm_head)."""
    block_rows = block_rows or rows_per_block(vocab)
    parts = []
    for start in range(0, hidden.shape[0], block_rows):
        end = min(start + block_rows, hidden.shape[0])
        logits = compute_logits(hidden[start:end])                            # [b, V] float32
        logp = torch.log_softmax(logits.float(), dim=-1)                      # [b, V]
        del logits
        part = [logp.gather(-1, targets[start:end, None])[:, 0]]              # [b]
        if top_k:
            part += list(logp.topk(top_k, dim=-1))                            # [b, k] values, ids
        if token_ids is not None:
            part.append(logp.gather(-1, token_ids[start:end].clamp(min=0)))   # [b, K]
        parts.append(part)
    cols = [torch.cat(c) for c in zip(*parts)] if parts else []
    out = RowLogprobs(cols[0] if cols else targets.new_zeros(0, dtype=torch.float32))
    if top_k and cols:
        out.top_logprobs, out.top_ids = cols[1], cols[2]
    if token_ids is not None and cols:
        out.ids_logprobs = cols[-1]
    return out
