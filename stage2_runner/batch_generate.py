"""Static-batch generation on the ModelRunner: the stage-2 demo and test harness.

All requests prefill together in one extend batch (optionally in two parts, to exercise
extend-over-a-cached-prefix), then decode together until each has its tokens. Slots come
from the pool's allocator and are all returned at the end. Stage 3 replaces this loop
with a real scheduler; this file shows the runner's contract with nothing else around it.
"""
from __future__ import annotations

import torch

from stage2_runner.forward_batch import make_batch, to_device
from stage2_runner.model_runner import ModelRunner
from stage2_runner.sampler import SamplingInfo


def extend(runner: ModelRunner, rows, prefix_lens, new_tokens, last_slots):
    """Allocate slots for new tokens, record them in req_to_token, run one forward."""
    pool = runner.pool
    locs = []
    for i, (row, p, toks) in enumerate(zip(rows, prefix_lens, new_tokens)):
        assert toks, "every request needs at least one new token per extend"
        slots = pool.allocator.alloc_extend(p, last_slots[i], len(toks))
        pool.req_to_token[row, p:p + len(toks)] = to_device(slots.to(torch.int32), pool.req_to_token.device)
        last_slots[i] = int(slots[-1])
        locs.append(slots)
    batch = make_batch(rows, prefix_lens, new_tokens, torch.cat(locs), runner.device)
    return runner.forward(batch)


def batch_generate(runner: ModelRunner, prompts: list[list[int]], max_new_tokens: int,
                   params: dict | None = None, split_prefill_at: int | None = None,
                   return_logits: bool = False):
    """Greedy by default; returns per-request output ids (and step logits if asked)."""
    pool, n = runner.pool, len(prompts)
    rows = [pool.alloc_row() for _ in prompts]
    last, lens = [-1] * n, [0] * n
    outs, step_logits = [[] for _ in prompts], []
    try:
        if split_prefill_at:                     # part 1: a prefix of every prompt
            extend(runner, rows, lens, [p[:split_prefill_at] for p in prompts], last)
            lens = [min(split_prefill_at, len(p)) for p in prompts]
        feed = [p[l:] for p, l in zip(prompts, lens)]
        for _ in range(max_new_tokens):
            logits = extend(runner, rows, lens, feed, last)
            info = SamplingInfo.from_params([params or {"temperature": 0.0}] * n,
                                            runner.config.vocab_size, runner.device)
            toks = runner.sample(logits, info).tokens.tolist()
            step_logits.append(logits.clone())      # a graph runner reuses its output buffer
            lens = [l + len(f) for l, f in zip(lens, feed)]
            for o, t in zip(outs, toks):
                o.append(t)
            feed = [[t] for t in toks]
    finally:
        for row, l in zip(rows, lens):
            pool.allocator.free(pool.req_to_token[row, :l].long())
            pool.free_row(row)
    return (outs, step_logits) if return_logits else outs
