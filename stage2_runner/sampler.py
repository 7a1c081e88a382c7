"""Batched sampling with per-request parameters.

    sample(logits [B, V] float32, info) -> SampleOutput(tokens [B], logprobs [B], top ...)

Order of operations, per row: logit_bias, then penalties, on raw logits -> grammar mask (rows
with a grammar only: forbidden tokens -> -inf) -> (greedy rows: argmax) ->
temperature -> top_k / top_p / min_p filter -> draw. A draw is the "exponential race"
argmax(p / E), E ~ Exp(1), which samples exactly from p without torch.multinomial's
host-side checks; rows with a seed take E from their own generator seeded by
(seed, step), so a seeded request reproduces whatever batch it runs in.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stage2_runner.forward_batch import to_device


@dataclass
class SamplingInfo:
    temperatures: torch.Tensor        # [B] float, 0 = greedy
    top_ps: torch.Tensor              # [B] float in (0, 1]
    top_ks: torch.Tensor              # [B] int, >= 1 (vocab size when disabled)
    min_ps: torch.Tensor              # [B] float in [0, 1]
    seeds: list[int | None] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)     # tokens generated so far (seeded rows)
    # Penalties (None when no row uses them: skips all penalty work)
    frequency_penalties: torch.Tensor | None = None   # [B]
    presence_penalties: torch.Tensor | None = None    # [B]
    repetition_penalties: torch.Tensor | None = None  # [B], 1 = off
    output_counts: torch.Tensor | None = None         # [B, V] counts of generated tokens
    seen_mask: torch.Tensor | None = None             # [B, V] prompt or output token seen
    logit_bias: tuple | None = None                   # (rows [N], token ids [N], biases [N]) or None
    token_ids: torch.Tensor | None = None             # [B, K] ids whose logprobs to return, -1 = none
    # Structured output: (rows [N], bitmask [N, ceil(V / 32)] int32), bit t set = token t
    # allowed; None when no row has a grammar (then no mask work at all).
    grammar_mask: tuple | None = None
    top_logprobs_num: int = 0
    # Host-side flags so a batch that is all greedy / unfiltered skips the O(V log V) sort
    all_greedy: bool = False
    needs_filter: bool = True
    need_logprobs: bool = True        # False: skip the [B, V] log-softmax (nobody asked)

    @classmethod
    def from_params(cls, params: list[dict], vocab: int, device, histories=None, steps=None) -> "SamplingInfo":
        """params: per request dicts with temperature/top_p/top_k/min_p/penalties/seed;
        histories: per request (prompt_ids, output_ids), needed only for penalties;
        steps: tokens each request generated before this one (default: len(output_ids)).
        Decisions are made on the host lists and every tensor reaches the device in a
        non-blocking copy, so building the info never waits for the GPU."""
        # One pass over the requests, then columns: [B] per parameter.
        rows = [(float(p.get("temperature", 1.0)), float(p.get("top_p", 1.0)), float(p.get("min_p", 0.0)),
                 float(p.get("frequency_penalty", 0.0)), float(p.get("presence_penalty", 0.0)),
                 float(p.get("repetition_penalty", 1.0)), int(p.get("top_k", -1))) for p in params]
        temps, top_ps, min_ps, fp, pp, rp, top_k = (list(c) for c in zip(*rows))
        floats = to_device(torch.tensor([temps, top_ps, min_ps, fp, pp, rp], dtype=torch.float32), device)
        if steps is None:
            steps = [len(h[1]) for h in histories] if histories else [0] * len(params)
        info = cls(temperatures=floats[0], top_ps=floats[1], min_ps=floats[2],
                   top_ks=to_device(torch.tensor([k if k > 0 else vocab for k in top_k]), device),
                   seeds=[p.get("seed") for p in params], steps=list(steps),
                   top_logprobs_num=max(int(p.get("top_logprobs_num", 0)) for p in params),
                   all_greedy=all(t == 0 for t in temps),
                   needs_filter=any(0 < k < vocab for k in top_k) or any(p < 1 for p in top_ps)
                   or any(m > 0 for m in min_ps))
        biased = [(i, t, b) for i, p in enumerate(params) for t, b in (p.get("logit_bias") or {}).items()]
        if biased:                      # only requests that ask pay for it
            rows_toks = to_device(torch.tensor([[i for i, _, _ in biased], [t for _, t, _ in biased]]), device)
            info.logit_bias = (rows_toks[0], rows_toks[1],
                               to_device(torch.tensor([b for _, _, b in biased], dtype=torch.float32), device))
        if histories and (any(fp) or any(pp) or any(r != 1 for r in rp)):
            info.frequency_penalties, info.presence_penalties, info.repetition_penalties = floats[3:6]
            info.output_counts, info.seen_mask = _history_tensors(histories, vocab, device)
        return info


def _history_tensors(histories, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [B, V] of generated tokens and seen [B, V] (prompt or output), built from
    flat (row, token) index lists with one copy each."""
    out_rows = [i for i, (_, out) in enumerate(histories) for _ in out]
    out_toks = [t for _, out in histories for t in out]
    all_rows = [i for i, (prompt, out) in enumerate(histories) for _ in range(len(prompt) + len(out))]
    all_toks = [t for prompt, out in histories for t in list(prompt) + list(out)]
    idx = to_device(torch.tensor([out_rows + all_rows, out_toks + all_toks], dtype=torch.int64), device)
    n_out = len(out_rows)
    counts = torch.zeros(len(histories), vocab, device=device)
    counts.index_put_((idx[0, :n_out], idx[1, :n_out]), torch.ones(n_out, device=device), accumulate=True)
    seen = torch.zeros(len(histories), vocab, dtype=torch.bool, device=device)
    # Values as device tensors: a Python scalar here would cost a host sync.
    ones = torch.ones(idx.shape[1] - n_out, dtype=torch.bool, device=device)
    seen.index_put_((idx[0, n_out:], idx[1, n_out:]), ones)
    return counts, seen


@dataclass
class SampleOutput:
    tokens: torch.Tensor                 # [B] int64
    logprobs: torch.Tensor | None        # [B] log p(token) under the unfiltered distribution
    top_logprobs: torch.Tensor | None    # [B, k]
    top_ids: torch.Tensor | None         # [B, k]
    ids_logprobs: torch.Tensor | None = None   # [B, K] log p of info.token_ids (SGLang's token_ids_logprob)


def apply_penalties(logits: torch.Tensor, info: SamplingInfo) -> torch.Tensor:
    """OpenAI-style frequency/presence (on generated tokens) and HF/CTRL-style repetition
    penalty (on every seen token: positive logits divided, negative multiplied)."""
    if info.output_counts is None:
        return logits
    counts = info.output_counts
    logits = logits - info.frequency_penalties[:, None] * counts
    logits = logits - info.presence_penalties[:, None] * (counts > 0).float()
    rp = info.repetition_penalties[:, None]
    penalised = torch.where(logits > 0, logits / rp, logits * rp)
    return torch.where(info.seen_mask, penalised, logits)


def filter_probs(probs: torch.Tensor, info: SamplingInfo) -> torch.Tensor:
    """Zero the tokens outside top_k, outside the top_p nucleus, or below min_p * p_max."""
    sorted_p, idx = probs.sort(dim=-1, descending=True)             # [B, V]
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    drop = ranks >= info.top_ks[:, None]
    # Keep a token if the mass strictly before it is < top_p (the top token always stays).
    drop |= (sorted_p.cumsum(-1) - sorted_p) >= info.top_ps[:, None]
    drop |= sorted_p < info.min_ps[:, None] * sorted_p[:, :1]
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, idx, sorted_p)


def exponential_noise(shape, info: SamplingInfo, device) -> torch.Tensor:
    noise = torch.empty(shape, device=device).exponential_()
    for i, seed in enumerate(info.seeds):
        if seed is not None:
            g = torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + info.steps[i]) % (1 << 64))
            noise[i] = torch.empty(shape[1], device=device).exponential_(generator=g)
    return noise


def apply_grammar_mask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Forbidden tokens of the grammar rows -> -inf, all on the device (no host sync).
    bitmask [N, W] int32: unpack to [N, W, 32] bits (little-endian within a word), flatten
    to [N, W * 32] and cut to V. Out of place: the caller's logits stay untouched."""
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :logits.shape[-1]]   # [N, V]
    return logits.index_put((rows,), logits[rows].masked_fill(~allowed, float("-inf")))


def sample(logits: torch.Tensor, info: SamplingInfo) -> SampleOutput:
    logits = logits.float()
    if info.logit_bias is not None:                 # OpenAI's logit_bias: added to the raw logits
        rows, toks, bias = info.logit_bias
        logits = logits.index_put((rows, toks), bias, accumulate=True)
    logits = apply_penalties(logits, info)
    if info.grammar_mask is not None:               # last, so no bias or penalty can undo it
        logits = apply_grammar_mask(logits, *info.grammar_mask)
    greedy = logits.argmax(-1)
    if info.all_greedy:
        tokens = greedy
    else:
        temps = info.temperatures.clamp(min=1e-6)[:, None]
        probs = torch.softmax(logits / temps, dim=-1)
        if info.needs_filter:
            probs = filter_probs(probs, info)
        drawn = (probs / exponential_noise(probs.shape, info, probs.device)).argmax(-1)
        tokens = torch.where(info.temperatures == 0, greedy, drawn)
    if not (info.need_logprobs or info.top_logprobs_num):
        return SampleOutput(tokens, None, None, None)
    logp = torch.log_softmax(logits, dim=-1)
    out = SampleOutput(tokens, logp.gather(-1, tokens[:, None])[:, 0], None, None)
    if info.top_logprobs_num:
        out.top_logprobs, out.top_ids = logp.topk(info.top_logprobs_num, dim=-1)
    if info.token_ids is not None:
        out.ids_logprobs = logp.gather(-1, info.token_ids.clamp(min=0))
    return out
