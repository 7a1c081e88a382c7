"""What the main process keeps per request, and the native result built from it.

    GenInput      one sequence to generate: ids, sampling params, logprob options, labels
    ReqState      its cumulative output (text, ids, logprobs) and its asyncio queue
    apply_output(state, StrOut)           fold one detokenizer output into the state
    native_result(state, StrOut, tok)     SGLang's {"text", "output_ids", "meta_info"}

Logprobs come back as SGLang's triples [logprob, token id, text or null]; prompt logprobs
(`logprob_start_len` >= 0) as `meta_info.input_token_logprobs` (first entry's logprob null),
`input_top_logprobs` and `input_token_ids_logprobs` (first entry null).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from server.managers import io_struct as io
from stage3_scheduler.sampling_params import SamplingParams


@dataclass
class GenInput:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    arrival: float = field(default_factory=time.perf_counter)     # e2e_latency counts tokenization too
    # `rid` is internal and unique; the client's rid (if any) groups its n samples for
    # /abort_request, and `label` (e.g. "job-1") is what meta_info.id shows.
    client_rid: str | None = None
    label: str | None = None
    token_ids_logprob: list[int] = field(default_factory=list)    # SGLang's token_ids_logprob
    logprob_start_len: int = -1                                   # >= 0: prompt logprobs too


@dataclass
class ReqState:
    inp: GenInput
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    ids_logprobs: list = field(default_factory=list)
    input_logprobs: list = field(default_factory=list)       # prompt logprobs: (lp or None, id)
    input_top_logprobs: list = field(default_factory=list)
    input_ids_logprobs: list = field(default_factory=list)
    finished: bool = False
    aborted_by_client: bool = False
    first_token_at: float | None = None       # for TTFT / ITL metrics
    last_token_at: float = 0.0
    metric_tokens: int = 0


def apply_output(state: ReqState, out: io.StrOut) -> None:
    """Fold one StrOut (new text, ids, logprobs) into the request's cumulative state."""
    state.text += out.text
    state.output_ids += out.new_token_ids
    state.logprobs += out.logprobs
    state.top_logprobs += out.top_logprobs
    state.ids_logprobs += out.ids_logprobs
    state.input_logprobs += out.input_logprobs
    state.input_top_logprobs += out.input_top_logprobs
    state.input_ids_logprobs += out.input_ids_logprobs
    state.finished = out.finished


def native_result(state: ReqState, out: io.StrOut, tokenizer) -> dict:
    """SGLang's cumulative /generate result; `tokenizer` None (--skip_tokenizer_init): no texts."""
    meta = {"id": state.inp.label or state.inp.rid, "finish_reason": out.finish_reason,
            "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens, "cached_tokens": out.cached_tokens,
            "e2e_latency": time.perf_counter() - state.inp.arrival,
            "weight_version": "default"}     # SGLang's field; weights are never updated in place here
    if state.inp.return_logprob:        # SGLang's triples: [logprob, token id, text or null]
        dec = tokenizer.decode if state.inp.return_text_in_logprobs and tokenizer else None
        triple = lambda lp, t: [lp, t, dec([t]) if dec else None]  # noqa: E731
        rows = lambda rs: [None if r is None else [triple(lp, t) for lp, t in r] for r in rs]  # noqa: E731
        sides = [("output", state.logprobs, state.top_logprobs, state.ids_logprobs)]
        if state.inp.logprob_start_len >= 0:       # prompt logprobs; the first has none
            sides.append(("input", state.input_logprobs, state.input_top_logprobs, state.input_ids_logprobs))
        for side, lps, tops, ids in sides:
            meta[f"{side}_token_logprobs"] = [triple(lp, t) for lp, t in lps]
            if state.inp.top_logprobs_num:
                meta[f"{side}_top_logprobs"] = rows(tops)
            if state.inp.token_ids_logprob:
                meta[f"{side}_token_ids_logprobs"] = rows(ids)
    return {"text": state.text, "output_ids": list(state.output_ids), "meta_info": meta}
