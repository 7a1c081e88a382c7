"""Prompt (input) logprobs: SGLang's `logprob_start_len` >= 0 with `return_logprob`.

    wants(req)                       does this request want prompt logprobs at all?
    cache_limit(req)                 how many leading tokens may come from the prefix cache
    plan(batch) -> Plan | None       which rows of an extend batch need their hidden states
    compute(plan, runner, hidden)    their logprobs (device), copied to the host without a wait
    report(req)                      the lists SGLang returns, on the request's first output

The logits at prompt position p predict token p + 1, so for a prompt ids[0..L) and a start
s the request needs the hidden states of positions s .. L-2 (position L-1's logits give the
first output token, as for every request). SGLang's answer has L - s entries, the first
one without a logprob: [(None, ids[s]), (lp(ids[s+1]), ids[s+1]), ..., (lp(ids[L-1]), ids[L-1])];
top-k and token_ids_logprob lists start with None the same way.

Chunked prefill: each extend computes the positions of its chunk; `req.prompt_lp_pos` is
the next position still needed, and the results of each chunk wait on the request until its
first output. Prefix cache: a cached prefix has no hidden states, so admission takes at
most `cache_limit` tokens from the cache (SGLang limits its match the same way); positions
before `prompt_lp_pos` are done already, so a retracted request can reuse them.
A batch where no request asks costs one Python loop over its requests and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stage2_runner.forward_batch import to_device
from stage2_runner.prompt_logprobs import RowLogprobs, block_logprobs
from stage3_scheduler.request import Req


def wants(r: Req) -> bool:
    return r.return_logprob and r.logprob_start_len >= 0


def next_position(r: Req) -> int:
    """The first prompt position whose logits are still needed."""
    return max(r.prompt_lp_pos, r.logprob_start_len)


def cache_limit(r: Req) -> int:
    """Leading tokens of r that may come from the prefix cache."""
    if wants(r) and next_position(r) < len(r.input_ids) - 1:
        return next_position(r)                 # from here on, positions need their logits
    return r.seq_len


@dataclass
class Plan:
    rows: list[int] = field(default_factory=list)      # [N] indices into the batch's tokens T
    targets: list[int] = field(default_factory=list)   # [N] the token each row predicts
    spans: list[tuple[Req, int, int]] = field(default_factory=list)   # (request, first row, rows)
    top_k: int = 0
    token_ids: list[list[int]] = field(default_factory=list)          # [N, K] per row, -1 pads


def plan(batch: list[tuple[Req, int]]) -> Plan | None:
    """batch: (request, new tokens) in the order of the extend batch's token layout."""
    out, offset = Plan(), 0
    for r, n in batch:
        if wants(r):
            first, last = next_position(r), min(r.kv_len + n, len(r.input_ids) - 1)   # positions [first, last)
            if first < last:
                assert first >= r.kv_len, f"{r.rid}: prompt position {first} has no hidden state (cached)"
                out.spans.append((r, len(out.rows), last - first))
                out.rows += range(offset + first - r.kv_len, offset + last - r.kv_len)
                out.targets += r.input_ids[first + 1:last + 1]
                out.top_k = max(out.top_k, r.top_logprobs_num)
                out.token_ids += [r.token_ids_logprob] * (last - first)
                r.prompt_lp_pos = last
        offset += n
    if not out.rows:
        return None
    if any(out.token_ids):
        k = max(map(len, out.token_ids))
        out.token_ids = [ids + [-1] * (k - len(ids)) for ids in out.token_ids]
    else:
        out.token_ids = []
    return out


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """Start a device -> host copy; the commit that reads it comes after a sync that covers it
    (stage 3: the sampled tokens' `.tolist()`; stage 5: the in-flight batch's event)."""
    return t.to("cpu", non_blocking=True) if t is not None and t.is_cuda else t


def compute(p: Plan, runner, hidden: torch.Tensor) -> None:
    """hidden: [N, hidden] of the plan's rows. Leaves each request its part of the results."""
    dev = hidden.device
    idx = to_device(torch.tensor([p.targets, *zip(*p.token_ids)] if p.token_ids else [p.targets]), dev)
    token_ids = idx[1:].T.contiguous() if p.token_ids else None                        # [N, K]
    res = block_logprobs(runner.model.compute_logits, hidden, idx[0], runner.config.vocab_size,
                         p.top_k, token_ids)
    host = RowLogprobs(*(_to_host(t) for t in res.fields()))
    for r, first, count in p.spans:
        r.prompt_lp_parts.append((host, first, first + count))


def report(r: Req) -> None:
    """Move the request's prompt logprobs into its pending output (its first one)."""
    start, ids = r.logprob_start_len, r.input_ids
    values, tops, id_lps = [], [None], [None]
    for host, a, b in r.prompt_lp_parts:
        values += host.logprobs[a:b].tolist()
        if r.top_logprobs_num and host.top_ids is not None:
            k = r.top_logprobs_num
            tops += [list(zip(v[:k], t[:k])) for v, t in zip(host.top_logprobs[a:b].tolist(),
                                                             host.top_ids[a:b].tolist())]
        if r.token_ids_logprob and host.ids_logprobs is not None:
            n = len(r.token_ids_logprob)
            id_lps += [list(zip(v[:n], r.token_ids_logprob)) for v in host.ids_logprobs[a:b].tolist()]
    assert len(values) == len(ids) - 1 - start, f"{r.rid}: {len(values)} prompt logprobs for {len(ids) - 1 - start}"
    r.input_report = r.pending_input = ([(None, ids[start])] + list(zip(values, ids[start + 1:])),
                       tops if r.top_logprobs_num else [], id_lps if r.token_ids_logprob else [])
    r.prompt_lp_parts = []
