"""Every message that crosses a process boundary, as typed msgspec Structs in msgpack.

    TokenizerManager --GenerateReq/AbortReq/FlushCacheReq/StatsReq--> scheduler
    scheduler        --BatchTokenOut-------------------------------> detokenizer
    detokenizer      --BatchStrOut---------------------------------> TokenizerManager
    scheduler        --FlushCacheOut/StatsOut----------------------> TokenizerManager
    TokenizerManager --Ping--> detokenizer --the same Ping-----------> TokenizerManager (liveness)
    child process    --Ready (over its start-up pipe)--------------> launcher

Decoding is typed: each receiver's decoder accepts only the union of structs it expects,
so a malformed or foreign message raises a decode error instead of becoming an object.
Nothing here is ever pickled (pickle over a socket is remote code execution).
"""
from __future__ import annotations

from typing import Any, Union

import msgspec


class GenerateReq(msgspec.Struct, tag=True):
    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any]       # validated SamplingParams.to_dict()
    return_logprob: bool = False
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] = []     # ids whose logprobs come back with every token
    logprob_start_len: int = -1           # >= 0: prompt logprobs from this position on


class AbortReq(msgspec.Struct, tag=True):
    rid: str


class FlushCacheReq(msgspec.Struct, tag=True):
    query_id: str


class StatsReq(msgspec.Struct, tag=True):
    query_id: str


class FlushCacheOut(msgspec.Struct, tag=True):
    query_id: str
    success: bool


class StatsOut(msgspec.Struct, tag=True):
    query_id: str
    stats: dict[str, Any]


class Ping(msgspec.Struct, tag=True):
    """A liveness probe the detokenizer echoes: its return proves the detokenizer still works."""
    query_id: str


class DetokParams(msgspec.Struct):
    """How to turn a request's tokens into text; sent once, with its first output."""
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    stop: list[str] = []


class TokenOut(msgspec.Struct):
    rid: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[tuple[float, int]] = []                 # (logprob, id) per new token
    top_logprobs: list[list[tuple[float, int]]] = []       # per new token, when asked for
    params: DetokParams | None = None
    ids_logprobs: list[list[tuple[float, int]]] = []       # per new token: token_ids_logprob's ids
    # prompt logprobs (first output only); the first entry has no logprob, as in SGLang
    input_logprobs: list[tuple[float | None, int]] = []
    input_top_logprobs: list[list[tuple[float, int]] | None] = []
    input_ids_logprobs: list[list[tuple[float, int]] | None] = []


class BatchTokenOut(msgspec.Struct, tag=True):
    outs: list[TokenOut]


class StrOut(msgspec.Struct):
    rid: str
    text: str                              # new text since the previous StrOut of this rid
    new_token_ids: list[int]
    finished: bool
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[tuple[float, int]] = []
    top_logprobs: list[list[tuple[float, int]]] = []
    ids_logprobs: list[list[tuple[float, int]]] = []
    input_logprobs: list[tuple[float | None, int]] = []
    input_top_logprobs: list[list[tuple[float, int]] | None] = []
    input_ids_logprobs: list[list[tuple[float, int]] | None] = []


class BatchStrOut(msgspec.Struct, tag=True):
    outs: list[StrOut]


class Ready(msgspec.Struct, tag=True):
    """A child's start-up report: `info` (model facts) on success, `error` on failure."""
    who: str
    info: dict[str, Any] = {}
    error: str | None = None


ToScheduler = Union[GenerateReq, AbortReq, FlushCacheReq, StatsReq]
ToTokenizer = Union[BatchStrOut, FlushCacheOut, StatsOut, Ping]
ToDetokenizer = Union[BatchTokenOut, Ping]

encode = msgspec.msgpack.Encoder().encode
scheduler_decoder = msgspec.msgpack.Decoder(ToScheduler)
detokenizer_decoder = msgspec.msgpack.Decoder(ToDetokenizer)
tokenizer_decoder = msgspec.msgpack.Decoder(ToTokenizer)
ready_decoder = msgspec.msgpack.Decoder(Ready)
